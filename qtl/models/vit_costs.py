"""Parameters and FLOPs per component of a ViT / QViT, and the parameter-matched classical ViT.

What ``mode=describe`` prints for ``model=vit | qvit``, so claims like "99.99% fewer
parameters, 89% fewer GFLOPs" can be checked: parameters per component (analytic, and from a
built module: they must agree), classical multiply-accumulates and FLOPs per image of one
forward pass, and the quantum layers' gate counts kept apart (a circuit is gates on qubits,
not FLOPs; simulating it classically costs far more, which the benchmark measures).

FLOP conventions (one forward pass, one image): a multiply-accumulate is 2 FLOPs; bias and
residual adds 1 per element; LayerNorm 8 per element; softmax 5 per score (+1 for the 1/sqrt
scale); GELU 8 per element; the mean pool 1 per element. The quantum projections cost 0
classical FLOPs here; their encoding, rotation and CNOT gates and <Z> measurements are counted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from qtl.models.vit_config import ViTConfig, validate_vit
from qtl.quantum.circuit import entangler_pairs

LN_FLOPS, SOFTMAX_FLOPS, GELU_FLOPS = 8, 5, 8


@dataclass
class Component:
    """One row of the describe table: counts per image, forward pass."""

    name: str
    params: int = 0
    macs: int = 0  # classical multiply-accumulates
    flops: int = 0  # classical FLOPs (2 per MAC + elementwise)
    circuits: int = 0  # quantum circuit executions
    qubits: int = 0  # width of those circuits
    gates_1q: int = 0  # single-qubit gates (encoding + variational)
    gates_2q: int = 0  # CNOTs
    measurements: int = 0  # <Z> expectation values

    def add(self, other: Component) -> None:
        for f in ("params", "macs", "flops", "circuits", "gates_1q", "gates_2q", "measurements"):
            setattr(self, f, getattr(self, f) + getattr(other, f))
        self.qubits = max(self.qubits, other.qubits)


@dataclass
class Costs:
    """Every component, plus totals."""

    rows: list[Component] = field(default_factory=list)

    def row(self, name: str) -> Component:
        for r in self.rows:
            if r.name == name:
                return r
        r = Component(name)
        self.rows.append(r)
        return r

    @property
    def total(self) -> Component:
        out = Component("total")
        for r in self.rows:
            out.add(r)
        return out

    def as_dict(self) -> dict[str, Any]:
        rows = [*self.rows, self.total]
        return {r.name: {k: v for k, v in vars(r).items() if k != "name"} for r in rows}


def _tokens(cfg: ViTConfig, image_shape: tuple[int, int, int]) -> tuple[int, int]:
    h, w, _ = image_shape
    p = cfg.patch_size
    if h < p or w < p:
        raise ValueError(f"model.patch_size={p} is larger than the {h}x{w} image")
    patches = (h // p) * (w // p)
    return patches, patches + (1 if cfg.pool == "token" else 0)


def _theta_params(cfg: ViTConfig, wires: int) -> int:
    per = 2 if cfg.circuit.rotation == "rz_ry" else 1
    return cfg.circuit.layers * wires * per


def _quantum(cfg: ViTConfig, name: str, wires: int, tokens: int) -> Component:
    c = cfg.circuit
    enc = 2 if c.encoding == "h_ry" else 1
    rot = 2 if c.rotation == "rz_ry" else 1
    cnots = len(entangler_pairs(c.entangler, wires))
    return Component(
        name,
        params=_theta_params(cfg, wires),
        circuits=tokens,
        qubits=wires,
        gates_1q=tokens * wires * (enc + c.layers * rot),
        gates_2q=tokens * c.layers * cnots,
        measurements=tokens * wires,
    )


def _dense(name: str, d_in: int, d_out: int, tokens: int) -> Component:
    macs = tokens * d_in * d_out
    return Component(name, params=d_in * d_out + d_out, macs=macs, flops=2 * macs + tokens * d_out)


def vit_costs(cfg: ViTConfig, image_shape: tuple[int, int, int], n_outputs: int) -> Costs:
    """Per-component parameters, MACs, FLOPs and gate counts (one image, forward)."""
    validate_vit(cfg)
    d, m, heads, p = cfg.hidden_size, cfg.mlp_size, cfg.num_heads, cfg.patch_size
    patches, t = _tokens(cfg, image_shape)
    channels = image_shape[2]
    costs = Costs()
    costs.rows.append(
        Component(
            "patch embedding",
            params=p * p * channels * d + d,
            macs=patches * p * p * channels * d,
            flops=2 * patches * p * p * channels * d + patches * d,
        )
    )
    extra = d if cfg.pool == "token" else 0
    costs.rows.append(Component("position embedding", params=t * d + extra, flops=t * d))
    norms = costs.row("layer norms")
    att_c, att_q = costs.row("attention projections (classical)"), None
    if set(cfg.quantum) & {"q", "k", "v", "o"}:
        att_q = costs.row("attention projections (quantum)")
    core = costs.row("attention scores and mixing")
    mlp_c = costs.row("MLP (classical)")
    mlp_q = costs.row("MLP (quantum)") if "mlp" in cfg.quantum else None
    residual = costs.row("residual adds")
    for _ in range(cfg.num_blocks):
        for _norm in range(2):
            norms.add(Component("", params=2 * d, flops=LN_FLOPS * t * d))
        for proj in ("q", "k", "v", "o"):
            if proj in cfg.quantum:
                att_q.add(_quantum(cfg, proj, d, t))
            else:
                att_c.add(_dense(proj, d, d, t))
        macs = 2 * t * t * d  # q k^T over heads, then weights @ v
        core.add(Component("", macs=macs, flops=2 * macs + (SOFTMAX_FLOPS + 1) * heads * t * t))
        mlp_c.add(_dense("fc1", d, m, t))
        if mlp_q is not None:
            mlp_q.add(_quantum(cfg, "mlp", m, t))
        mlp_c.add(Component("", flops=GELU_FLOPS * t * m))
        mlp_c.add(_dense("fc2", m, d, t))
        residual.add(Component("", flops=2 * t * d))
    norms.add(Component("", params=2 * d, flops=LN_FLOPS * t * d))
    head = _dense("classifier", d, n_outputs, 1)
    head.name = "pool and classifier"
    head.flops += t * d
    costs.rows.append(head)
    costs.rows = [r for r in costs.rows if r.params or r.flops or r.circuits]
    return costs


def parameter_count(cfg: ViTConfig, image_shape: tuple[int, int, int], n_outputs: int) -> int:
    """Total trainable parameters (analytic; equal to the built module's count)."""
    return vit_costs(cfg, image_shape, n_outputs).total.params


def match_parameter_count(
    cfg: ViTConfig, image_shape: tuple[int, int, int], n_outputs: int
) -> tuple[ViTConfig, int, int]:
    """The classical ViT closest in parameters to ``cfg`` with ``match_params_of`` quantum.

    Heads, blocks, patch, pool and dropout stay; hidden size (a multiple of the heads, up to
    twice the reference's) and MLP size (1 to 4x hidden) are searched for the smallest
    difference, ties going to the sizes nearest the reference's (MLP up to 4x the larger hidden
    size). Returns (config, its count,
    the target count).
    """
    quantum = cfg.match_params_of if cfg.match_params_of is not None else cfg.quantum
    reference = replace(cfg, quantum=list(quantum), match_params_of=None)
    target = parameter_count(reference, image_shape, n_outputs)
    best: tuple[tuple[int, int, int], ViTConfig, int] | None = None
    h = cfg.num_heads
    for hidden in range(h, 2 * max(cfg.hidden_size, h) + 1, h):
        for mlp in range(1, 4 * max(hidden, cfg.hidden_size, cfg.mlp_size) + 1):
            cand = replace(cfg, hidden_size=hidden, mlp_size=mlp, quantum=[], match_params_of=None)
            n = parameter_count(cand, image_shape, n_outputs)
            key = (abs(n - target), abs(hidden - cfg.hidden_size), abs(mlp - cfg.mlp_size))
            if best is None or key < best[0]:
                best = (key, cand, n)
    assert best is not None
    return best[1], best[2], target


def resolve(cfg: ViTConfig, image_shape: tuple[int, int, int], n_outputs: int) -> ViTConfig:
    """``cfg`` with ``match_params_of`` carried out for this dataset (else ``cfg`` itself)."""
    if cfg.match_params_of is None:
        return cfg
    return match_parameter_count(cfg, image_shape, n_outputs)[0]


# ----------------------------------------------------------------------------- modules


def module_parameter_table(model: Any) -> dict[str, int]:
    """Parameters per component of a built (or ``nnx.eval_shape``-built) ViT, same row names
    as :func:`vit_costs`: the truth the analytic count is tested against. Read from the
    parameter paths, so a parameter the analytic count forgets shows up as a difference."""
    import math

    import jax
    from flax import nnx

    def key(entry: Any) -> Any:
        return getattr(entry, "key", getattr(entry, "name", entry))

    table: dict[str, int] = {}
    leaves = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
    for path, leaf in leaves:
        names = [key(p) for p in path]
        n = math.prod(leaf.shape)
        top = names[0]
        if top == "patch":
            row = "patch embedding"
        elif top in ("pos", "cls"):
            row = "position embedding"
        elif top == "norm" or (top == "blocks" and names[2] in ("norm1", "norm2")):
            row = "layer norms"
        elif top == "blocks" and names[2] == "attn":
            kind = "quantum" if names[4] == "weights" else "classical"
            row = f"attention projections ({kind})"
        elif top == "blocks" and names[2] == "mlp":
            row = "MLP (quantum)" if names[3] == "quantum" else "MLP (classical)"
        elif top == "head":
            row = "pool and classifier"
        else:
            raise ValueError(f"parameter {'/'.join(map(str, names))} belongs to no component")
        table[row] = table.get(row, 0) + n
    return {k: v for k, v in table.items() if v}


def xla_flops(forward: Callable[..., Any], *args: Any) -> float | None:
    """FLOPs XLA counts for ``forward(*args)`` (any model, e.g. a CNN teacher), or None."""
    import jax

    try:
        analysis = jax.jit(forward).lower(*args).compile().cost_analysis()
    except Exception:  # cost analysis is best-effort on some backends
        return None
    if isinstance(analysis, list):
        analysis = analysis[0] if analysis else {}
    flops = (analysis or {}).get("flops")
    return float(flops) if flops is not None else None


# ----------------------------------------------------------------------------- printing


def format_costs(title: str, costs: Costs) -> str:
    """A fixed-width table: params, MFLOPs, circuits, gates per component."""
    lines = [
        title,
        f"  {'component':36s} {'params':>9s} {'MFLOPs':>9s} {'circuits':>8s} {'qubits':>6s} "
        f"{'1q gates':>9s} {'CNOTs':>8s}",
    ]
    for r in [*costs.rows, costs.total]:
        lines.append(
            f"  {r.name:36s} {r.params:9,d} {r.flops / 1e6:9.4f} {r.circuits:8,d} "
            f"{(r.qubits or ''):>6} {r.gates_1q:9,d} {r.gates_2q:8,d}"
        )
    return "\n".join(lines)


def _fewer(a: float, b: float, what: str) -> str:
    """'12.34% fewer <what>' when a < b, else '12.34% more <what>'."""
    change = 100 * (1 - a / b)
    return f"{abs(change):.2f}% {'fewer' if change >= 0 else 'more'} {what}"


def describe_pair(
    qvit: ViTConfig,
    vit: ViTConfig,
    image_shape: tuple[int, int, int],
    n_outputs: int,
    teacher: dict[str, float] | None = None,
) -> tuple[str, dict[str, Any]]:
    """The QViT, the (resolved) classical ViT and optionally a teacher side by side.

    ``teacher``: ``{"params": ..., "flops": ...}`` of any classifier (e.g. from
    :func:`xla_flops`). Returns (printable text, the same numbers as a dict).
    """
    vit_resolved = resolve(vit, image_shape, n_outputs)
    q, c = vit_costs(qvit, image_shape, n_outputs), vit_costs(vit_resolved, image_shape, n_outputs)
    qt, ct = q.total, c.total
    how = (
        f"classical ViT: hidden {vit_resolved.hidden_size}, MLP {vit_resolved.mlp_size} "
        f"(searched to the parameter count of the same config with {vit.match_params_of} "
        "quantum)"
        if vit.match_params_of is not None
        else f"classical ViT: same dims (hidden {vit.hidden_size}, MLP {vit.mlp_size})"
    )
    lines = [
        format_costs(f"QViT ({qt.params:,d} parameters)", q),
        format_costs(f"ViT ({ct.params:,d} parameters)", c),
        how,
        f"QViT vs ViT: {_fewer(qt.params, ct.params, 'parameters')}, "
        f"{_fewer(qt.flops, ct.flops, 'classical FLOPs')}",
    ]
    same = vit_costs(replace(qvit, quantum=[], match_params_of=None), image_shape, n_outputs).total
    lines.append(
        f"QViT vs the ViT of equal dims ({same.params:,d} parameters): "
        f"{_fewer(qt.params, same.params, 'parameters')}, "
        f"{_fewer(qt.flops, same.flops, 'classical FLOPs')}"
    )
    out: dict[str, Any] = {
        "qvit": q.as_dict(),
        "vit": c.as_dict(),
        "vit_config": {k: v for k, v in vars(vit_resolved).items() if k != "circuit"},
        "vit_equal_dims": {"params": same.params, "flops": same.flops},
    }
    if teacher:
        lines.append(
            f"QViT vs teacher ({teacher['params']:,.0f} parameters, "
            f"{teacher['flops'] / 1e9:.3f} GFLOPs): "
            f"{_fewer(qt.params, teacher['params'], 'parameters')}, "
            f"{_fewer(qt.flops, teacher['flops'], 'classical FLOPs')}"
        )
        out["teacher"] = teacher
    return "\n".join(lines), out
