"""A user-defined sparsity penalty, ready for the penalty lab.

    jsdl penalty-lab hoyer --import examples/my_penalty.py --scale small --out runs/lab_hoyer

The Hoyer penalty (Hoyer 2004; used for SAEs by e.g. Kurtz et al.) is the per-sample ratio
||x_q||_1 / ||x_q||_2: it measures how spread the code is, independently of its overall size (degree 0
under x_q -> a x_q), so unlike L1 it does not pull every active code towards 0. ``eps`` keeps the
value and its gradient finite at an all-zero code (0/0 otherwise: the lab's mechanical checks catch
exactly that kind of bug).

A penalty is ``fn(codes [B, n_q], params, **hyper) -> scalar``: the batch mean of a per-sample sum
(or, as here, of a per-sample value), jit- and vmap-compatible, permutation invariant across latents.
"""
import jax.numpy as jnp

import jsdl


@jsdl.penalties.register("hoyer")
def hoyer(codes, params, *, eps=1e-6):
    """Hoyer sparsity: E ||x_q||_1 / sqrt(||x_q||_2^2 + eps)."""
    l1 = jnp.sum(jnp.abs(codes), axis=-1)
    l2 = jnp.sqrt(jnp.sum(codes * codes, axis=-1) + eps)
    return jnp.mean(l1 / l2)
