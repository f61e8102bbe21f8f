"""Launch models: which kernels an MoE backend launches for given per-expert token counts.

A launch model is data (``configs/launch/*.yaml``): a list of kernels, each with a scope (once per
active expert, once per MoE layer, once per shared-expert block), optional ``let`` variables, an
optional ``choose`` table (first row whose ``when`` holds sets tile sizes etc.), optional
``derive`` variables computed after the choice, and grid / block formulas. Formulas are integer
arithmetic over the layer's dimensions and the token counts, parsed once into a restricted
expression language: names, integer literals, + - * // % **, comparisons, ``and`` / ``or`` /
``not``, ``x if c else y`` and the functions cdiv, min, max, pow2ceil. Nothing else is
evaluated, so a launch-model file cannot run code.

Variables: M (routed (token, slot) pairs for the scope: one expert's count for ``expert``,
T*K for ``layer``, T for ``shared``), T (real prompt tokens), E, K, H, I, SI, G (2 if gated)
plus the file's ``params``.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from routescan.telemetry.schema import KernelLaunch, LayerDims, Region, RequestTrace, Unit

# counts up to this are looked up in a dense per-shape table (one formula evaluation per M, once)
DENSE_TABLE = 8192


class LaunchModelError(ValueError):
    """A launch-model file is malformed or a formula failed; the message names file and kernel."""


class Scope(StrEnum):
    expert = "expert"
    layer = "layer"
    shared = "shared"


def _cdiv(a: int, b: int) -> int:
    if b <= 0:
        raise ZeroDivisionError("cdiv by a non-positive number")
    return -(-a // b)


def _pow2ceil(a: int) -> int:
    return 1 if a <= 1 else 1 << (int(a) - 1).bit_length()


_FUNCS: dict[str, Callable[..., int]] = {"cdiv": _cdiv, "min": min, "max": max, "pow2ceil": _pow2ceil}
_GLOBALS: dict[str, Any] = {"__builtins__": {}, **_FUNCS}
_ALLOWED = (
    ast.Expression,
    ast.BinOp,
    ast.UnaryOp,
    ast.BoolOp,
    ast.Compare,
    ast.IfExp,
    ast.Call,
    ast.Name,
    ast.Load,
    ast.Constant,
    ast.Add,
    ast.Sub,
    ast.Mult,
    ast.FloorDiv,
    ast.Mod,
    ast.Pow,
    ast.USub,
    ast.UAdd,
    ast.Not,
    ast.And,
    ast.Or,
    ast.Lt,
    ast.LtE,
    ast.Gt,
    ast.GtE,
    ast.Eq,
    ast.NotEq,
)


@dataclass(frozen=True)
class Formula:
    """A validated, compiled integer expression."""

    source: str
    names: frozenset[str]
    _code: Any = field(repr=False, compare=False)

    @classmethod
    def parse(cls, source: str | int | bool) -> Formula:
        text = str(int(source)) if isinstance(source, bool | int) else str(source)
        try:
            tree = ast.parse(text, mode="eval")
        except SyntaxError as exc:
            raise LaunchModelError(f"formula '{text}' is not valid: {exc.msg}") from exc
        names: set[str] = set()
        for node in ast.walk(tree):
            if not isinstance(node, _ALLOWED):
                raise LaunchModelError(f"formula '{text}': {type(node).__name__} is not allowed")
            if isinstance(node, ast.Constant) and not isinstance(node.value, int):
                raise LaunchModelError(f"formula '{text}': only integer literals are allowed")
            if isinstance(node, ast.Call):
                if not isinstance(node.func, ast.Name) or node.func.id not in _FUNCS or node.keywords:
                    raise LaunchModelError(f"formula '{text}': only {sorted(_FUNCS)} may be called")
            elif isinstance(node, ast.Name) and node.id not in _FUNCS:
                names.add(node.id)
        return cls(text, frozenset(names), compile(tree, f"<formula {text}>", "eval"))

    def __call__(self, env: Mapping[str, int]) -> int:
        try:
            value = eval(self._code, _GLOBALS, env)  # validated AST, no builtins
        except NameError:
            missing = sorted(self.names - env.keys())
            raise LaunchModelError(f"formula '{self.source}' uses unknown variables {missing}") from None
        if isinstance(value, bool):
            return int(value)
        if not isinstance(value, int):
            raise LaunchModelError(f"formula '{self.source}' gave a non-integer {value!r}")
        return value


@dataclass(frozen=True)
class ChooseRow:
    when: Formula | None
    assign: tuple[tuple[str, Formula], ...]


@dataclass(frozen=True)
class KernelSpec:
    name: str
    scope: Scope
    grid: tuple[Formula, Formula, Formula]
    block: tuple[Formula, Formula, Formula]
    let: tuple[tuple[str, Formula], ...] = ()
    choose: tuple[ChooseRow, ...] = ()
    derive: tuple[tuple[str, Formula], ...] = ()

    def geometry(self, env: dict[str, int]) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        env = dict(env)
        for var, formula in self.let:
            env[var] = formula(env)
        if self.choose:
            for row in self.choose:
                if row.when is None or row.when(env):
                    for var, formula in row.assign:
                        env[var] = formula(env)
                    break
            else:
                raise LaunchModelError(f"kernel '{self.name}': no 'choose' row matched {self._vars(env)}")
        for var, formula in self.derive:
            env[var] = formula(env)
        grid = tuple(f(env) for f in self.grid)
        block = tuple(f(env) for f in self.block)
        if min(grid + block) < 0:
            raise LaunchModelError(f"kernel '{self.name}': negative launch size {grid} x {block}")
        return grid, block  # type: ignore[return-value]

    def names(self) -> set[str]:
        """Every variable its formulas read (before its own let / choose / derive assignments)."""
        formulas = [*self.grid, *self.block, *(f for _, f in self.let), *(f for _, f in self.derive)]
        for row in self.choose:
            formulas.extend(f for _, f in row.assign)
            if row.when is not None:
                formulas.append(row.when)
        return set().union(*(f.names for f in formulas))

    @staticmethod
    def _vars(env: Mapping[str, int]) -> str:
        return ", ".join(f"{k}={v}" for k, v in sorted(env.items()) if k in ("M", "T", "E", "K", "H", "I"))


def _dim3(raw: Any, where: str) -> tuple[Formula, Formula, Formula]:
    if not isinstance(raw, list | tuple) or not 1 <= len(raw) <= 3:
        raise LaunchModelError(f"{where}: expected a list of 1 to 3 formulas")
    items = [Formula.parse(x) for x in raw] + [Formula.parse(1)] * (3 - len(raw))
    return items[0], items[1], items[2]


def _assignments(raw: Any, where: str) -> tuple[tuple[str, Formula], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, Mapping):
        raise LaunchModelError(f"{where}: expected a mapping of variable: formula")
    return tuple((str(k), Formula.parse(v)) for k, v in raw.items())


@dataclass(frozen=True)
class LaunchModel:
    """Turns per-expert routed counts into the kernel launches a backend would make."""

    name: str
    unit: Unit
    kernels: tuple[KernelSpec, ...]
    params: Mapping[str, int]
    description: str = ""
    source: str = ""
    # Thread totals are a pure function of (M or T, layer widths): cached across layers and requests.
    _memo: dict = field(default_factory=dict, repr=False, compare=False, hash=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "<dict>") -> LaunchModel:
        try:
            name = str(data["name"])
            raw_kernels = data["kernels"]
        except (KeyError, TypeError) as exc:
            raise LaunchModelError(f"{source}: a launch model needs 'name' and 'kernels'") from exc
        kernels = []
        for i, raw in enumerate(raw_kernels or []):
            where = f"{source}: kernels[{i}] ({raw.get('name', '?') if isinstance(raw, Mapping) else '?'})"
            if not isinstance(raw, Mapping):
                raise LaunchModelError(f"{where}: expected a mapping")
            unknown = set(raw) - {"name", "scope", "grid", "block", "let", "choose", "derive"}
            if unknown:
                raise LaunchModelError(f"{where}: unknown keys {sorted(unknown)}")
            try:
                scope = Scope(raw.get("scope", "expert"))
            except ValueError as exc:
                raise LaunchModelError(f"{where}: scope must be one of {[s.value for s in Scope]}") from exc
            rows = []
            for row in raw.get("choose") or []:
                when = row.get("when")
                rows.append(
                    ChooseRow(
                        Formula.parse(when) if when is not None else None,
                        _assignments(row.get("set"), f"{where} choose"),
                    )
                )
            kernels.append(
                KernelSpec(
                    name=str(raw["name"]),
                    scope=scope,
                    grid=_dim3(raw.get("grid"), f"{where} grid"),
                    block=_dim3(raw.get("block"), f"{where} block"),
                    let=_assignments(raw.get("let"), f"{where} let"),
                    choose=tuple(rows),
                    derive=_assignments(raw.get("derive"), f"{where} derive"),
                )
            )
        if not kernels:
            raise LaunchModelError(f"{source}: no kernels")
        for spec in kernels:
            if spec.scope == Scope.expert and "T" in spec.names():
                # what lets a whole count matrix be computed per distinct count (expert_threads)
                raise LaunchModelError(
                    f"{source}: kernel '{spec.name}' is per expert, so its size may depend on that "
                    "expert's M and the layer's widths, not on the prompt length T"
                )
        params = {str(k): int(v) for k, v in (data.get("params") or {}).items()}
        return cls(
            name=name,
            unit=Unit(data.get("unit", "threads")),
            kernels=tuple(kernels),
            params=params,
            description=str(data.get("description", "")).strip(),
            source=source,
        )

    @classmethod
    def from_yaml(cls, path: str | Path) -> LaunchModel:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise LaunchModelError(f"{path}: cannot read launch model: {exc}") from exc
        return cls.from_dict(data, source=str(path))

    def with_params(self, **overrides: int) -> LaunchModel:
        unknown = set(overrides) - set(self.params)
        if unknown:
            raise LaunchModelError(
                f"{self.name}: unknown params {sorted(unknown)}; known: {sorted(self.params)}"
            )
        return LaunchModel(
            self.name, self.unit, self.kernels, {**self.params, **overrides}, self.description, self.source
        )

    @property
    def has_regions(self) -> bool:
        """Whether it launches any per-layer or shared-expert kernel (work outside single experts)."""
        return any(k.scope != Scope.expert for k in self.kernels)

    @property
    def per_expert(self) -> bool:
        """Whether any launch size follows per-expert counts (False: only totals are visible)."""
        return any(k.scope == Scope.expert for k in self.kernels)

    def _env(self, dims: Mapping[str, int], tokens: int | None = None) -> dict[str, int]:
        env = {**self.params, **dims}
        if tokens is not None:
            env["T"] = int(tokens)
        return env

    def _memo_for(self, key: tuple) -> dict:
        # bounded: a model has few distinct layer shapes (the widths come from the trace, so a
        # client sending many made-up shapes only ever costs this much memory)
        if len(self._memo) > 256:
            self._memo.clear()
        return self._memo.setdefault(key, {})

    def expert_threads(self, dims: Mapping[str, int], counts: np.ndarray | Sequence[int]) -> np.ndarray:
        """Threads each expert's kernels launch, summed over the kernels, for routed counts of one
        layer shape (``counts``: any integer array; 0 launches nothing, as the eager loop skips
        experts that were not hit). Expert-scope sizes depend on M and the layer's widths only, so a
        table over M is computed once per shape and indexed by the whole array; counts past
        :data:`DENSE_TABLE` are computed per distinct value."""
        counts = np.asarray(counts, dtype=np.int64)
        memo = self._memo_for(("expert", tuple(sorted(dims.items()))))
        top = int(counts.max()) if counts.size else 0
        table = memo.get("table")
        if table is None or (len(table) <= top and len(table) <= DENSE_TABLE):
            size = min(max(top + 1, 2 * (0 if table is None else len(table)), 64), DENSE_TABLE + 1)
            start = 0 if table is None else len(table)
            extra = np.array([self._expert_total(dims, m) for m in range(start, size)], dtype=np.float64)
            table = memo["table"] = extra if start == 0 else np.concatenate([table, extra])
        if top < len(table):
            return table[counts]
        out = np.empty(counts.shape, dtype=np.float64)
        small = counts < len(table)
        out[small] = table[counts[small]]
        big = counts[~small]
        values, inverse = np.unique(big, return_inverse=True)
        sparse = memo.setdefault("sparse", {})
        totals = [
            sparse[m] if m in sparse else sparse.setdefault(m, self._expert_total(dims, m))
            for m in values.tolist()
        ]
        out[~small] = np.asarray(totals, dtype=np.float64)[inverse]
        return out

    def _scope_env(
        self, spec: KernelSpec, env: Mapping[str, int], tokens: int, m: int = 0
    ) -> dict[str, int] | None:
        """The variables a kernel of ``spec``'s scope is sized from, or None when it is not launched:
        an ``expert`` kernel over that expert's M routed pairs (none when it got nothing: the eager
        loop skips it), a ``layer`` kernel over all T*K pairs, a ``shared`` kernel over the T tokens
        of a layer that has a shared expert."""
        if spec.scope == Scope.expert:
            return {**env, "M": int(m)} if m > 0 else None
        if spec.scope == Scope.layer:
            return {**env, "M": int(tokens) * env["K"]}
        return {**env, "M": int(tokens)} if env.get("SI", 0) > 0 else None

    def _expert_total(self, dims: Mapping[str, int], m: int) -> int:
        env = self._env(dims)
        total = 0
        for spec in self.kernels:
            if spec.scope == Scope.expert and (scoped := self._scope_env(spec, env, 0, m)) is not None:
                total += _threads(self._geometry(spec, scoped))
        return total

    def region_threads(self, dims: Mapping[str, int], tokens: int) -> int:
        """Threads of the layer's work that is not one expert's: ``layer`` kernels (router, fused
        MoE) over T*K routed pairs and ``shared`` kernels over T tokens."""
        table = self._memo_for(("region", tuple(sorted(dims.items()))))
        if len(table) > 65_536:
            table.clear()
        total = table.get(tokens)
        if total is None:
            env = self._env(dims, tokens)
            total = 0
            for spec in self.kernels:
                if spec.scope != Scope.expert and (scoped := self._scope_env(spec, env, tokens)) is not None:
                    total += _threads(self._geometry(spec, scoped))
            table[tokens] = total
        return total

    def layer_launches(
        self, layer: int, dims: Mapping[str, int], counts: Sequence[int], tokens: int
    ) -> list[KernelLaunch]:
        """Every kernel launch of one MoE layer, ``counts[e]`` (token, slot) pairs routed to expert e:
        the per-kernel attachment a trace may carry to be checked against CUPTI records. Featurising
        never needs it (:meth:`expert_threads` gives the same sums without building launches)."""
        if len(counts) != dims["E"]:
            raise LaunchModelError(f"{self.name}: {len(counts)} counts for {dims['E']} experts")
        env = self._env(dims, tokens)
        out: list[KernelLaunch] = []
        for spec in self.kernels:
            region = {Scope.expert: Region.expert, Scope.layer: Region.layer, Scope.shared: Region.shared}[
                spec.scope
            ]
            for expert, m in enumerate(counts) if spec.scope == Scope.expert else [(None, 0)]:
                if (scoped := self._scope_env(spec, env, tokens, m)) is not None:
                    _emit(out, spec.name, layer, expert, region, self._geometry(spec, scoped))
        return out

    def _geometry(
        self, spec: KernelSpec, env: dict[str, int]
    ) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        try:
            return spec.geometry(env)
        except (LaunchModelError, ZeroDivisionError, OverflowError) as exc:
            raise LaunchModelError(f"{self.source}: kernel '{spec.name}': {exc}") from exc


_REGION = {Scope.expert: Region.expert, Scope.layer: Region.layer, Scope.shared: Region.shared}


def _threads(geometry: tuple[tuple[int, int, int], tuple[int, int, int]]) -> int:
    (gx, gy, gz), (bx, by, bz) = geometry
    return gx * gy * gz * bx * by * bz


def _emit(
    out: list[KernelLaunch],
    kernel: str,
    layer: int,
    expert: int | None,
    region: Region,
    geometry: tuple[tuple[int, int, int], tuple[int, int, int]],
) -> None:
    threads = _threads(geometry)
    if threads == 0:
        return  # an empty launch is not made (PyTorch / Triton skip zero-size work)
    grid, block = geometry
    out.append(
        KernelLaunch(
            kernel=kernel, layer=layer, expert=expert, region=region, grid=grid, block=block, threads=threads
        )
    )


def layer_env(trace: RequestTrace, i: int) -> dict[str, int]:
    """The formula variables of a trace's i-th MoE layer (E, K and its widths H, I, SI, G)."""
    dims = trace.layer_dims(i)
    if dims is None:
        raise LaunchModelError(
            f"trace {trace.trace_id} carries no layer widths (dims), which a launch model needs to turn "
            "its token counts into kernel launches; collect it again with a current RouteScan"
        )
    return dims.env(trace.experts_per_layer[i], None if trace.top_k is None else trace.top_k[i])


@dataclass
class SignalThreads:
    """A batch of traces under one signal: per (trace, layer, expert) threads and per-layer totals."""

    expert: np.ndarray  # (traces, sum of experts per layer), float64, layer after layer
    region: np.ndarray  # (traces, layers): threads of the MoE work that is not one expert's


def signal_threads(traces: Sequence[RequestTrace], launch_model: LaunchModel | None) -> SignalThreads:
    """What a signal shows of traces of one model (same layers and experts, which the caller checks).

    With a launch model, token counts become the threads its kernels launch, computed per distinct
    count across the whole batch; with ``None`` the counts are read as measured (a kernel collector's
    threads, or router counts under the ``router`` signal)."""
    if not traces:
        return SignalThreads(np.zeros((0, 0)), np.zeros((0, 0)))
    flat = np.stack([t.counts.flat for t in traces])
    first = traces[0]
    n_layers = len(first.layers)
    if launch_model is None:
        region = np.zeros((len(traces), n_layers))
        for row, t in enumerate(traces):
            if t.region_threads is not None:
                region[row] = t.region_threads
        return SignalThreads(flat.astype(np.float64), region)
    tokens = np.array([t.prompt_tokens for t in traces])
    region = np.zeros((len(traces), n_layers), dtype=np.float64)
    # traces of one model share their widths; a batch whose widths differ is split by them
    groups: dict[Any, list[int]] = {}
    for row, t in enumerate(traces):
        groups.setdefault(_freeze(t.dims), []).append(row)
    expert = None if len(groups) == 1 else np.empty(flat.shape, dtype=np.float64)
    for rows in groups.values():
        idx = np.asarray(rows) if expert is not None else slice(None)  # the usual batch: no gather
        shapes = _shape_groups(traces[rows[0]])
        part = _expert_threads(launch_model, shapes, flat[idx])
        if expert is None:
            expert = part
        else:
            expert[idx] = part
        if launch_model.has_regions:
            lengths = tokens[idx].tolist()
            for env, layers, _ in shapes:
                per_length = {n: launch_model.region_threads(env, n) for n in set(lengths)}
                region[np.ix_(np.arange(len(traces))[idx], layers)] = np.array(
                    [per_length[n] for n in lengths]
                )[:, None]
    return SignalThreads(expert, region)


def _expert_threads(
    launch_model: LaunchModel, shapes: list[tuple[dict[str, int], list[int], np.ndarray]], counts: np.ndarray
) -> np.ndarray:
    """Expert threads of a ``(traces, experts)`` count block, one table look-up per layer shape."""
    if len(shapes) == 1:  # most MoEs: every layer alike, the whole block in one look-up
        return launch_model.expert_threads(shapes[0][0], counts)
    out = np.empty(counts.shape, dtype=np.float64)
    for env, _, cols in shapes:
        out[:, cols] = launch_model.expert_threads(env, counts[:, cols])
    return out


def _shape_groups(trace: RequestTrace) -> list[tuple[dict[str, int], list[int], np.ndarray]]:
    """The trace's layers grouped by shape: (formula variables, layer positions, count columns).
    Layers of one shape (most MoEs: all of them) are computed in one table look-up."""
    key = (
        _freeze(trace.dims),
        tuple(trace.experts_per_layer),
        None if trace.top_k is None else tuple(trace.top_k),
    )
    groups = _GROUPS.get(key)
    if groups is None:
        offsets = trace.offsets()
        by_shape: dict[tuple, list[int]] = {}
        for i in range(len(trace.layers)):
            by_shape.setdefault(tuple(sorted(layer_env(trace, i).items())), []).append(i)
        groups = [
            (dict(env), layers, np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in layers]))
            for env, layers in by_shape.items()
        ]
        if len(_GROUPS) > 256:
            _GROUPS.clear()
        _GROUPS[key] = groups
    return groups


_GROUPS: dict[tuple, list] = {}


def _freeze(dims: LayerDims | list[LayerDims] | None) -> Any:
    if dims is None:
        return None
    if isinstance(dims, LayerDims):
        return (dims.H, dims.I, dims.SI, dims.G)
    return tuple((d.H, d.I, d.SI, d.G) for d in dims)
