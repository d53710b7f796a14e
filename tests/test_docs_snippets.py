"""Every ```python block of README.md and docs/ (subfolders too) runs, each in a fresh namespace, no undefined names.

A block is run as written. The package's own names come from the block's own imports; the objects a user brings
(their network ``net``, a batch ``x`` with labels ``y``, a DDP wrapper, a data loader...) come from a named setup
of this file, requested by an HTML comment on the line before the block (invisible on the rendered page)::

    <!-- snippet-setup: model -->
    ```python
    import meanflow_losses as mfl

    report = mfl.check_model(model, x, model_kwargs={"y": y})
    ```

``<!-- snippet: skip (reason) -->`` skips a block that cannot run on a CPU in a few seconds (CUDA, torchrun,
downloads); the reason is required and shows in the test report. Blocks of other languages (bash, plain text) are
not run. The tests are parametrized by ``file:line`` of the opening fence, and a failing block's traceback points at
its lines in the markdown file.
"""

from __future__ import annotations

import gc
import re
import textwrap
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn

import meanflow_losses as mfl
from tests.nets import time_features

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`\s]*)[^`]*$")
_DIRECTIVE = re.compile(r"^\s*<!--\s*snippet(?P<kind>-setup)?\s*:\s*(?P<body>.*?)\s*-->\s*$")
_SKIP = re.compile(r"^skip\s*\((?P<reason>.*\S.*)\)$")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class Snippet:
    """One ```python block: where it is, its code, and its directive."""

    file: str  # path as shown in test ids (relative to the repository root when it is inside it)
    line: int  # 1-based line of the opening fence
    code: str
    setup: str | None = None
    skip: str | None = None

    @property
    def id(self) -> str:
        return f"{self.file}:{self.line}"


def extract(text: str, file: str) -> list[Snippet]:
    """The ```python blocks of a markdown text, with the directive on the nearest non-blank line before each.

    Raises ValueError for a malformed directive, a skip without a reason, a directive that no python block follows,
    or an unclosed fence.
    """
    lines = text.splitlines()
    out: list[Snippet] = []
    pending: tuple[int, str | None, str | None] | None = None  # (line, setup, skip) of the last directive
    i = 0
    while i < len(lines):
        line = lines[i]
        d = _DIRECTIVE.match(line)
        if d:
            if pending is not None:
                raise ValueError(f"{file}:{pending[0]}: snippet directive not followed by a ```python block")
            body = d["body"]
            if d["kind"]:
                if not _NAME.match(body):
                    raise ValueError(f"{file}:{i + 1}: snippet-setup needs one setup name, got {body!r}")
                pending = (i + 1, body, None)
            else:
                s = _SKIP.match(body)
                if not s:
                    raise ValueError(f"{file}:{i + 1}: expected `<!-- snippet: skip (reason) -->`, got {body!r}")
                pending = (i + 1, None, s["reason"].strip())
            i += 1
            continue
        m = _FENCE.match(line)
        if not m:
            if line.strip() and pending is not None:
                raise ValueError(f"{file}:{pending[0]}: snippet directive not followed by a ```python block")
            i += 1
            continue
        fence, indent, start = m["fence"], m["indent"], i
        j = i + 1
        closing = re.compile(re.escape(fence[0]) + f"{{{len(fence)},}}")
        while j < len(lines) and not closing.fullmatch(lines[j].strip()):
            j += 1
        if j == len(lines):
            raise ValueError(f"{file}:{start + 1}: unclosed code fence")
        if m["info"].lower() == "python":
            body_lines = [ln[len(indent) :] if ln.startswith(indent) else ln for ln in lines[start + 1 : j]]
            setup, skip = (pending[1], pending[2]) if pending else (None, None)
            out.append(Snippet(file, start + 1, textwrap.dedent("\n".join(body_lines)) + "\n", setup, skip))
        elif pending is not None:
            raise ValueError(f"{file}:{pending[0]}: snippet directive not followed by a ```python block")
        pending = None
        i = j + 1
    if pending is not None:
        raise ValueError(f"{file}:{pending[0]}: snippet directive not followed by a ```python block")
    return out


def _display(path: Path) -> str:
    try:
        return path.relative_to(ROOT).as_posix()
    except ValueError:
        return str(path)


def collect() -> list[Snippet]:
    return [s for path in DOC_FILES for s in extract(path.read_text(encoding="utf-8"), _display(path))]


# --------------------------------------------------------------------------------------------------------------------
# Setups: the user's objects, at toy sizes (2-D data, 8 rows, MLPs of width 32), so that every block runs in seconds.

Setup = Callable[[ExitStack], dict[str, Any]]
SETUPS: dict[str, Setup] = {}
SLOW_SETUPS: set[str] = set()  # their blocks are marked slow (left out of the fast lane, `-m "not slow"`)

NUM_CLASSES = 1000  # as on ImageNet: label 1000 is the null class of the docs' guidance snippets
BATCH = 8


def setup(name: str, *, slow: bool = False) -> Callable[[Setup], Setup]:
    def register(fn: Setup) -> Setup:
        SETUPS[name] = fn
        if slow:
            SLOW_SETUPS.add(name)
        return fn

    return register


class IntervalNet(nn.Module):
    """``net(z, t, h, y)`` with ``h = t - r``, like the papers' DiTs (labels 0..999, 1000 the null class)."""

    def __init__(self, dim: int = 2, width: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(NUM_CLASSES + 1, 8)
        self.net = nn.Sequential(nn.Linear(dim + 24, width), nn.SiLU(), nn.Linear(width, dim))

    def forward(self, z: Tensor, t: Tensor, h: Tensor, y: Tensor) -> Tensor:
        feats = [z, time_features(t).to(z.dtype), time_features(h).to(z.dtype), self.embed(y).to(z.dtype)]
        return self.net(torch.cat(feats, dim=1))


class VelocityNet(nn.Module):
    """A flow-matching network ``fm_net(z, t, y)``."""

    def __init__(self, dim: int = 2, width: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(NUM_CLASSES + 1, 8)
        self.net = nn.Sequential(nn.Linear(dim + 16, width), nn.SiLU(), nn.Linear(width, dim))

    def forward(self, z: Tensor, t: Tensor, y: Tensor) -> Tensor:
        return self.net(torch.cat([z, time_features(t).to(z.dtype), self.embed(y).to(z.dtype)], dim=1))


def _batch(n: int = BATCH) -> tuple[Tensor, Tensor]:
    return torch.randn(n, 2), torch.randint(0, NUM_CLASSES, (n,))


def _interval_net(stack: ExitStack) -> dict[str, Any]:
    """``net(z, t, h, y)`` and a labelled batch ``x``, ``y``."""
    x, y = _batch()
    return {"net": IntervalNet(), "x": x, "y": y}


@setup("torch_compile", slow=True)
def _torch_compile(stack: ExitStack) -> dict[str, Any]:
    """``net``, ``x``, ``y`` for the torch.compile recipe (compiling takes about half a minute on 2 CPU cores)."""
    return _interval_net(stack)


@setup("model")
def _model(stack: ExitStack) -> dict[str, Any]:
    """A ``model(z, r, t, y=...)`` in the package protocol and a labelled batch ``x``, ``y``."""
    x, y = _batch()
    return {"model": mfl.adapters.from_interval_net(IntervalNet()), "x": x, "y": y}


@setup("protocol")
def _protocol(stack: ExitStack) -> dict[str, Any]:
    """The protocol's arguments: ``model``, ``z``, ``r <= t`` and ``model_kwargs``."""
    t = torch.rand(BATCH)
    _, y = _batch()
    return {
        "model": mfl.adapters.from_interval_net(IntervalNet()),
        "z": torch.randn(BATCH, 2),
        "r": t * torch.rand(BATCH),
        "t": t,
        "model_kwargs": {"y": y},
    }


@setup("alphaflow_step")
def _alphaflow_step(stack: ExitStack) -> dict[str, Any]:
    """``model``, ``x``, ``y`` and a step ``k`` at which the snippet's curriculum gives alpha = 0.73."""
    return {**_model(stack), "k": 184_000}


@setup("ddp")
def _ddp(stack: ExitStack) -> dict[str, Any]:
    """``net``, ``x``, ``y``, a one-process gloo ``ddp_model`` around ``from_interval_net(net)``, and ``log``."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        stack.callback(dist.destroy_process_group)
    ns = _interval_net(stack)
    ddp_model = nn.parallel.DistributedDataParallel(mfl.adapters.from_interval_net(ns["net"]))

    def release() -> None:
        # Free the reducer (which holds the process group) while the group is still registered: if the snippet's
        # namespace outlives destroy_process_group, the reducer's deallocation destroys the gloo group with the GIL
        # held, and joining its worker threads can deadlock (seen once in CI).
        for name in ("logger", "reducer", "process_group"):
            ddp_model.__dict__.pop(name, None)
        gc.collect()

    stack.callback(release)  # runs before the destroy_process_group registered above (last in, first out)
    logged: list[dict[str, float]] = []
    return {**ns, "ddp_model": ddp_model, "log": logged.append}


@setup("teacher")
def _teacher(stack: ExitStack) -> dict[str, Any]:
    """A frozen flow-matching ``fm_net(z, t, y)`` (eval mode), a ``student`` in the protocol, ``x``, ``y``."""
    x, y = _batch()
    fm_net = VelocityNet().eval().requires_grad_(False)
    return {"fm_net": fm_net, "student": mfl.adapters.from_interval_net(IntervalNet()), "x": x, "y": y}


@setup("training_loop")
def _training_loop(stack: ExitStack) -> dict[str, Any]:
    """``model``, an optimizer ``opt`` and a ``loader`` of three labelled batches."""
    model = mfl.adapters.from_interval_net(IntervalNet())
    return {
        "model": model,
        "opt": torch.optim.SGD(model.parameters(), lr=1e-3),
        "loader": [_batch() for _ in range(3)],
    }


# --------------------------------------------------------------------------------------------------------------------


def run(snippet: Snippet) -> dict[str, Any]:
    """Run one block in a fresh namespace (plus its setup); return the namespace.

    Warnings of the package (``mfl.MeanFlowWarning``) are errors: a documented snippet must not trigger them.
    """
    # blank lines in front, so that tracebacks show the block's own line numbers in the markdown file
    code = compile("\n" * snippet.line + snippet.code, snippet.file, "exec")
    with ExitStack() as stack:
        torch.manual_seed(0)
        ns: dict[str, Any] = {"__name__": "__snippet__"}
        if snippet.setup is not None:
            if snippet.setup not in SETUPS:
                raise KeyError(f"{snippet.id}: unknown snippet setup {snippet.setup!r}; defined: {sorted(SETUPS)}")
            ns.update(SETUPS[snippet.setup](stack))
        with warnings.catch_warnings():
            warnings.simplefilter("error", mfl.MeanFlowWarning)
            exec(code, ns)
    return ns


SNIPPETS = collect()


@pytest.mark.parametrize(
    "snippet",
    [pytest.param(s, id=s.id, marks=[pytest.mark.slow] if s.setup in SLOW_SETUPS else []) for s in SNIPPETS],
)
def test_snippet_runs(snippet: Snippet) -> None:
    if snippet.skip is not None:
        pytest.skip(snippet.skip)
    run(snippet)


def _fences(path: Path) -> Iterator[int]:
    for k, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if re.match(r"^\s*```python\s*$", line):
            yield k


def test_every_python_fence_is_collected() -> None:
    expected = [f"{_display(p)}:{k}" for p in DOC_FILES for k in _fences(p)]
    assert expected, "no ```python block found in README.md and docs/**/*.md"
    assert [s.id for s in SNIPPETS] == expected


def test_setups_exist_and_are_used() -> None:
    named = {s.setup for s in SNIPPETS if s.setup is not None}
    assert named <= set(SETUPS), f"unknown setups named in the docs: {sorted(named - set(SETUPS))}"
    assert set(SETUPS) <= named, f"setups no block uses: {sorted(set(SETUPS) - named)}"


def test_skips_are_rare() -> None:
    skipped = [s.id for s in SNIPPETS if s.skip is not None]
    assert len(skipped) <= max(1, len(SNIPPETS) // 5), skipped


# The runner itself: an undefined name fails, namespaces are fresh, directives are parsed strictly.

DOC = """\
Text.

```python
import meanflow_losses as mfl
defined_here = mfl.__version__
```

<!-- snippet-setup: model -->
```python
out = mfl.MeanFlowLoss()(model, x)
```

```python
print(defined_here)
```

```bash
this is not python
```

<!-- snippet: skip (needs CUDA) -->
```python
torch.cuda.synchronize()
```
"""


def test_runner_fails_on_undefined_names_and_keeps_namespaces_fresh() -> None:
    first, with_setup, fresh, skipped = extract(DOC, "doc.md")
    assert [s.line for s in (first, with_setup, fresh, skipped)] == [3, 9, 13, 22]
    assert run(first)["defined_here"] == mfl.__version__
    with pytest.raises(NameError, match="mfl"):  # the setup gives the user's objects, not the package's names
        run(with_setup)
    with pytest.raises(NameError, match="defined_here") as info:  # nothing leaks from the block before
        run(fresh)
    assert info.traceback[-1].lineno + 1 == 14  # the markdown file's line
    assert skipped.skip == "needs CUDA" and skipped.setup is None
    with pytest.raises(KeyError, match="unknown snippet setup"):
        run(Snippet("doc.md", 1, "pass\n", setup="no_such_setup"))


@pytest.mark.parametrize(
    "text",
    [
        "<!-- snippet: skip -->\n```python\npass\n```\n",
        "<!-- snippet: skip () -->\n```python\npass\n```\n",
        "<!-- snippet-setup: two names -->\n```python\npass\n```\n",
        "<!-- snippet-setup: model -->\nSome prose.\n\n```python\npass\n```\n",
        "<!-- snippet-setup: model -->\n```bash\nls\n```\n",
        "<!-- snippet-setup: model -->\n",
        "```python\npass\n",
    ],
    ids=[
        "skip-without-reason",
        "skip-empty-reason",
        "two-setup-names",
        "prose-between",
        "bash-block",
        "orphan",
        "unclosed",
    ],
)
def test_malformed_directives_fail(text: str) -> None:
    with pytest.raises(ValueError):
        extract(text, "doc.md")
