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

import yaml

from routescan.telemetry.schema import KernelLaunch, Phase, Region, Unit


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
    # Geometry is a pure function of (kernel, M, T, dims): cached across layers and requests.
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
    def per_expert(self) -> bool:
        """Whether any launch size follows per-expert counts (False: only totals are visible)."""
        return any(k.scope == Scope.expert for k in self.kernels)

    def layer_launches(
        self,
        layer: int,
        dims: Mapping[str, int],
        counts: Sequence[int],
        tokens: int,
        *,
        aggregate: bool = False,
    ) -> list[KernelLaunch]:
        """Launches of one MoE layer. ``counts[e]`` = (token, slot) pairs routed to expert e.

        ``aggregate`` gives what :meth:`RequestTrace.aggregated` would: one ``sum`` launch per
        (expert or region), built without the per-kernel objects. Fingerprints are unchanged and a
        big model's trace shrinks ~7x, which is what keeps the in-process agent cheap."""
        if len(counts) != dims["E"]:
            raise LaunchModelError(f"{self.name}: {len(counts)} counts for {dims['E']} experts")
        base = {**self.params, **dims, "T": int(tokens)}
        shape = (int(tokens), *sorted(dims.items()))
        memo = self._memo
        if len(memo) > 200_000:  # bounded; distinct (kernel, M, shape) keys are few in practice
            memo.clear()
        out: list[KernelLaunch] = []
        sums: dict[tuple[int | None, Region], int] = {}

        def emit(kernel: str, expert: int | None, region: Region, geo) -> None:
            if not aggregate:
                _emit(out, kernel, layer, expert, region, geo)
                return
            (gx, gy, gz), (bx, by, bz) = geo
            sums[expert, region] = sums.get((expert, region), 0) + gx * gy * gz * bx * by * bz

        for index, spec in enumerate(self.kernels):
            if spec.scope == Scope.expert:
                for expert, m in enumerate(counts):
                    if m <= 0:
                        continue  # the eager loop only visits experts that were hit
                    key = (index, int(m), shape)
                    geo = memo.get(key)
                    if geo is None:
                        geo = memo[key] = self._geometry(spec, {**base, "M": int(m)})
                    emit(spec.name, expert, Region.expert, geo)
            elif spec.scope == Scope.layer:
                routed = int(tokens) * dims["K"]
                emit(spec.name, None, Region.layer, self._geometry(spec, {**base, "M": routed}))
            elif dims.get("SI", 0) > 0:
                emit(spec.name, None, Region.shared, self._geometry(spec, {**base, "M": int(tokens)}))
        for (expert, region), threads in sums.items():
            _emit(out, "sum", layer, expert, region, ((threads, 1, 1), (1, 1, 1)))
        return out

    def _geometry(self, spec: KernelSpec, env: dict[str, int]):
        try:
            return spec.geometry(env)
        except (LaunchModelError, ZeroDivisionError, OverflowError) as exc:
            raise LaunchModelError(f"{self.source}: kernel '{spec.name}': {exc}") from exc


_LAUNCH_FIELDS = frozenset(KernelLaunch.model_fields)


def _emit(
    out: list[KernelLaunch],
    kernel: str,
    layer: int,
    expert: int | None,
    region: Region,
    geometry: tuple[tuple[int, int, int], tuple[int, int, int]],
) -> None:
    grid, block = geometry
    threads = grid[0] * grid[1] * grid[2] * block[0] * block[1] * block[2]
    if threads == 0:
        return  # an empty launch is not made (PyTorch / Triton skip zero-size work)
    # Trusted construction, as pydantic's model_construct does it but ~3x cheaper: this runs once
    # per (layer, expert, kernel) of every request. The values are integers the validated formulas
    # produced and scope fixes the region / expert pairing; whole traces are validated again when
    # written or read back, and a test checks these objects equal validated ones.
    launch = KernelLaunch.__new__(KernelLaunch)
    object.__setattr__(
        launch,
        "__dict__",
        {
            "kernel": kernel,
            "layer": layer,
            "expert": expert,
            "region": region,
            "grid": grid,
            "block": block,
            "threads": threads,
            "phase": Phase.prefill,
            "start_ns": None,
            "end_ns": None,
        },
    )
    object.__setattr__(
        launch, "__pydantic_fields_set__", set(_LAUNCH_FIELDS)
    )  # per instance: model_copy updates it
    object.__setattr__(launch, "__pydantic_extra__", None)
    object.__setattr__(launch, "__pydantic_private__", None)
    out.append(launch)
