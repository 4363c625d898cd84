"""``jsdl demo``: the front door. Until training lands it checks the objective end to end."""
from __future__ import annotations

import json
import os


def add_arguments(p):
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (used by the tests)")


def run(args) -> int:
    import jax
    import optax

    import jsdl

    os.makedirs(args.out, exist_ok=True)
    key = jax.random.PRNGKey(0)
    d, n_q, B = 32, 128, 256
    x = jax.nn.relu(jax.random.normal(key, (B, d)))
    results = {}
    for name, kw in {"relu_l1": dict(activation="relu", penalties={"l1": 1e-3}),
                     "topk": dict(activation="topk", k=8)}.items():
        spec = jsdl.make_spec(method="sae", n_latents=n_q, **kw)
        params = jsdl.init_params(key, spec, d)
        opt = optax.adam(1e-2)
        state = opt.init(params)

        @jax.jit
        def step(params, state):
            (loss, aux), g = jax.value_and_grad(jsdl.sdl_loss, has_aux=True)(params, jsdl.Batch(x), spec)
            upd, state = opt.update(g, state, params)
            return optax.apply_updates(params, upd), state, aux

        first = None
        for _ in range(50):
            params, state, aux = step(params, state)
            first = first or {k: float(v) for k, v in aux.items()}
        results[name] = {"first": first, "last": {k: float(v) for k, v in aux.items()}}
        print(f"{spec.describe()}: loss {first['loss']:.4f} -> {float(aux['loss']):.4f}, fvu {float(aux['fvu']):.3f}, l0 {float(aux['l0']):.1f}")
    with open(os.path.join(args.out, "demo.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.out}/demo.json")
    return 0
