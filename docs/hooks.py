"""mkdocs hook: the docstrings use Sphinx roles (:class:`~jsdl.SDLParams`, :func:`jsdl.train.fit`)
and ``::`` before literal blocks, which Markdown leaves as literal text; render the roles as code
spans (``SDLParams``, ``jsdl.train.fit``) and the ``::`` as ``:``."""
import re

_ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj):<code>(~?)([^<]*)</code>")


def _role(m: re.Match) -> str:
    tilde, target = m.groups()
    return f"<code>{target.rsplit('.', 1)[-1] if tilde else target}</code>"  # ~a.b.C shows C, as in Sphinx


def on_page_content(html, **kwargs):
    return _ROLE.sub(_role, html).replace("::</p>", ":</p>")
