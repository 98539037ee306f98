"""Any PennyLane device runs the circuit (``<circuit>.device``, docs/noise.md).

``head.device.name=default.mixed`` (``model.circuit.device.name=...`` for the QViT's layers)
runs the circuit on that device, outside the jitted step: a ``jax.pure_callback`` hands the
batch's circuits to the device as one batch of tapes (``qml.execute``: the device runs them as
it batches, e.g. one qiskit job), and a ``jax.custom_vjp`` asks the device for its own
gradient of that batch (PennyLane's autograd interface: ``gradient=adjoint`` takes the
device's best exact method, adjoint where it has one, else backprop, else parameter shift;
``gradient=parameter_shift`` the shifted tapes, sampled under ``shots`` as hardware would).

The circuit's other options keep their meaning: ``shots`` are the device's (each call's
sampling seeded from the circuit's key stream); ``noise`` channels are placed after every
gate as PennyLane channels where the device takes them (``default.mixed``: exact density
matrices), readout as a measurement-error channel there and applied exactly to <Z> on a
device without channels. Gate noise on a device that cannot run channels is refused.
Credentials never go in ``options``: a hardware plugin reads its own account or environment.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import json
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qtl.config import ConfigError
from qtl.quantum.circuit import CircuitSpec, Symbol, circuit_gates

# device-name prefix -> (the plugin's module, the qtl extra that installs it)
PLUGINS = {"qiskit.": ("pennylane_qiskit", "devices")}
# set by qtl itself: the circuit's width, its shots, and the seed drawn from the run's key
RESERVED = ("wires", "shots", "seed", "seed_simulator")
# option names that look like credentials: hardware plugins read their accounts themselves
SECRET = re.compile(r"token|secret|password|passwd|credential|api_?key|apikey", re.IGNORECASE)


def options_of(device: Any) -> dict[str, Any]:
    """``device.options`` as plain containers (a DictConfig when it comes from Hydra)."""
    from omegaconf import DictConfig, OmegaConf

    opts = device.options
    if isinstance(opts, DictConfig):
        opts = OmegaConf.to_container(opts, resolve=True)
    return dict(opts or {})


def is_device(opts: Any) -> bool:
    """Whether a circuit's options (``head``, ``model.circuit``) name a PennyLane device."""
    device = getattr(opts, "device", None)
    return device is not None and device.name is not None


def _plugin_devices() -> dict[str, Any]:
    from pennylane.devices import device_constructor

    return device_constructor.plugin_devices


def check_name(name: str, where: str) -> None:
    """One-line errors for an unknown device or a device whose plugin is not installed."""
    if name in _plugin_devices():
        return
    for prefix, (module, extra) in PLUGINS.items():
        if name.startswith(prefix) and importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"{where}='{name}' needs the '{extra}' extra, which is not installed "
                f"({module}): pip install -e '.[{extra}]'"
            )
    known = sorted(n for n in _plugin_devices() if n.split(".")[0] in ("default", "lightning"))
    raise ConfigError(
        f"{where}='{name}' is not an installed PennyLane device; e.g. one of: "
        f"{', '.join(known)} (qiskit.aer and other qiskit.* devices: the 'devices' extra)"
    )


def check_options(options: dict[str, Any], where: str) -> None:
    """Options qtl sets itself, and credentials, are refused (neither may be in a record)."""
    for key in options:
        if key in RESERVED:
            raise ConfigError(
                f"{where}.{key}: set by qtl (wires = the circuit's qubits, shots = the "
                "circuit's shots, the seed from the run's seed); remove it."
            )
        if SECRET.search(str(key)):
            raise ConfigError(
                f"{where}.{key}: credentials never go in a config (it is recorded); the "
                "device's plugin reads them from its own account or environment (docs/noise.md)."
            )


def check_device(spec: CircuitSpec, opts: Any, where: str) -> None:
    """Before any training: the device exists, takes the options, holds the circuit's qubits
    and runs its gates (and noise channels); one-line ConfigError naming the field if not."""
    if not is_device(opts):
        return
    if opts.shots is not None and (isinstance(opts.shots, bool) or opts.shots <= 0):
        raise ConfigError(f"{where}.shots={opts.shots}: expected a positive integer or null.")
    check_name(opts.device.name, f"{where}.device.name")
    check_options(options_of(opts.device), f"{where}.device.options")
    runner(spec, opts, where)  # builds the device and preprocesses the circuit once


def _key(spec: CircuitSpec, opts: Any) -> str:
    from dataclasses import asdict, is_dataclass

    from omegaconf import DictConfig, OmegaConf

    noise = opts.noise
    if isinstance(noise, DictConfig):
        noise = OmegaConf.to_container(noise, resolve=True)
    elif is_dataclass(noise):
        noise = asdict(noise)
    gradient = str(getattr(opts.gradient, "value", opts.gradient))
    body = [opts.device.name, options_of(opts.device), opts.shots, gradient, noise]
    return json.dumps([repr(spec), body], sort_keys=True, default=str)


def runner(spec: CircuitSpec, opts: Any, where: str = "head") -> DeviceRunner:
    """The (cached) runner of ``spec`` on ``opts.device`` (one per circuit and options)."""
    return _runner(_key(spec, opts), spec, opts, where)


_RUNNERS: dict[str, DeviceRunner] = {}  # a QViT has ~20 layers of two widths: build each once


def _runner(key: str, spec: CircuitSpec, opts: Any, where: str) -> DeviceRunner:
    if key not in _RUNNERS:
        _RUNNERS[key] = DeviceRunner(spec, opts, where)
    return _RUNNERS[key]


class DeviceRunner:
    """The circuit as tapes on one PennyLane device: forward, and the device's VJP."""

    def __init__(self, spec: CircuitSpec, opts: Any, where: str):
        from qtl.quantum.noise.params import noise_params

        self.spec = spec
        self.where = where
        self.name: str = opts.device.name
        self.options = options_of(opts.device)
        self.shots: int | None = opts.shots
        gradient = str(getattr(opts.gradient, "value", opts.gradient))
        self.template = list(circuit_gates(spec))
        # each parametrised gate's angle: ('x', (i,)) or ('theta', index), in tape order
        self.slots: list[Symbol] = [op.param for op in self.template if op.param is not None]
        noisy = _has_channels(opts.noise)
        self.noise = noise_params(spec, opts.noise) if noisy else None
        self.device = self._make(None)
        self.channels = self._takes_channels()
        gate = self.noise is not None and self.noise.gate_noise
        if gate and not self.channels:
            raise ConfigError(
                f"{where}.device.name='{self.name}' cannot run the circuit's noise channels "
                f"({where}.noise: gate noise needs a mixed-state device such as default.mixed); "
                "set the channels to 0 or use another device."
            )
        self._check_gates()
        self.diff_method = self._diff_method(gradient)
        # readout as a measurement-error channel on the device, else exactly on <Z> (in JAX)
        self.readout = self.noise if self.noise is not None and self.noise.readout else None

    # ------------------------------------------------------------------ device and checks

    def _make(self, seed: int | None) -> Any:
        import pennylane as qml

        kwargs = dict(self.options)
        if self.name == "qiskit.aer" and self.shots is None:
            kwargs.setdefault("method", "statevector")  # exact <Z> (else aer samples 1024)
        if seed is not None:
            cls = _plugin_devices()[self.name].load()
            params = inspect.signature(cls.__init__).parameters
            if "seed" in params:
                kwargs["seed"] = seed
            elif self.name.startswith("qiskit.aer"):
                kwargs["seed_simulator"] = seed
        try:
            dev = qml.device(self.name, wires=self.spec.n_qubits, **kwargs)
        except Exception as err:  # noqa: BLE001 - the plugin's own refusal, as one line
            raise ConfigError(
                f"{self.where}.device: '{self.name}' with options {self.options} cannot hold "
                f"the circuit's {self.spec.n_qubits} qubits: {_line(err)}"
            ) from err
        if dev.wires is not None and len(dev.wires) < self.spec.n_qubits:
            raise ConfigError(
                f"{self.where}.device.name='{self.name}' has {len(dev.wires)} wires; the "
                f"circuit needs {self.spec.n_qubits}."
            )
        return dev

    def _api(self) -> Any:
        import pennylane as qml

        dev = self.device
        return dev if isinstance(dev, qml.devices.Device) else qml.devices.LegacyDeviceFacade(dev)

    def _preprocess(self, tape: Any) -> None:
        api = self._api()
        config = api.setup_execution_config(None, tape)
        api.preprocess_transforms(config)([tape])

    def _takes_channels(self) -> bool:
        if self.noise is None:
            return False
        import pennylane as qml

        tape = qml.tape.QuantumScript(
            [qml.DepolarizingChannel(0.1, wires=0), qml.QubitChannel(_readout_kraus(0.1, 0.1), 0)],
            [qml.expval(qml.PauliZ(0))],
        )
        try:
            self._preprocess(tape)
        except Exception:  # noqa: BLE001 - any refusal means: no channels on this device
            return False
        return True

    def _check_gates(self) -> None:
        x = np.zeros((1, self.spec.n_qubits))
        theta = np.zeros((1, *self.spec.theta_shape))
        try:
            self._preprocess(self.tapes(x, theta, self.shots)[0])
        except Exception as err:  # noqa: BLE001 - the device's refusal, as one line
            raise ConfigError(
                f"{self.where}.device.name='{self.name}' cannot run the circuit: {_line(err)}"
            ) from err

    def _diff_method(self, gradient: str) -> str:
        if gradient == "parameter_shift":
            return "parameter-shift"
        import pennylane as qml

        api = self._api()
        legacy = not isinstance(self.device, qml.devices.Device)
        for method in ("adjoint", "backprop"):
            if legacy and method == "adjoint":
                continue  # a legacy plugin's adjoint is PennyLane's python one, if any
            config = qml.devices.ExecutionConfig(gradient_method=method, interface="autograd")
            if self.noise is not None and self.channels and method == "adjoint":
                continue  # adjoint differentiation needs pure states
            try:
                if api.supports_derivatives(config):
                    return method
            except Exception:  # noqa: BLE001
                continue
        return "parameter-shift"

    # ------------------------------------------------------------------------- the tapes

    def angles(self, x: np.ndarray, theta: np.ndarray) -> np.ndarray:
        """(R, K): every parametrised gate's angle of each row, in tape order."""
        cols = []
        for s in self.slots:
            cols.append(x[:, s.index[0]] if s.array == "x" else theta[(slice(None), *s.index)])
        return np.stack(cols, axis=1)

    def tapes(self, x: Any, theta: Any, shots: int | None, angles: Any = None) -> list:
        """One tape per row (``angles`` (R, K) may be autograd-traced)."""
        import pennylane as qml

        angles = self.angles(np.asarray(x), np.asarray(theta)) if angles is None else angles
        n = self.spec.n_qubits
        noise = self.noise if self.channels else None
        out = []
        for r in range(len(angles)):
            ops: list[Any] = []
            k = 0
            for op in self.template:
                wires = list(op.wires)
                gate = getattr(qml, op.name)
                if op.param is not None:
                    ops.append(gate(angles[r][k], wires=wires))
                    k += 1
                else:
                    ops.append(gate(wires=wires))
                if noise is not None:
                    ops += _channels(op.name, wires, noise)
            if noise is not None and noise.readout:
                for w in range(n):
                    a, b = float(noise.readout_01[w]), float(noise.readout_10[w])
                    if a > 0 or b > 0:
                        ops.append(qml.QubitChannel(_readout_kraus(a, b), wires=w))
            meas = [qml.expval(qml.PauliZ(w)) for w in range(n)]
            out.append(qml.tape.QuantumScript(ops, meas, shots=shots))
        return out

    def _device_for(self, seed: int | None) -> Any:
        return self.device if seed is None or self.shots is None else self._make(seed)

    def forward(self, x: np.ndarray, theta: np.ndarray, seed: int | None) -> np.ndarray:
        """(R, n) <Z> of each row (x (R, n), theta (R, *theta_shape))."""
        import pennylane as qml

        tapes = self.tapes(x, theta, self.shots)
        res = qml.execute(tapes, self._device_for(seed), diff_method=None)
        return np.asarray([np.asarray(r, dtype=np.float64) for r in res])

    def vjp(
        self, x: np.ndarray, theta: np.ndarray, g: np.ndarray, seed: int | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per-row cotangents (dx (R, n), dtheta (R, *theta_shape)) of sum(g * <Z>), from the
        device's gradient: exact tapes for ``gradient=adjoint``, sampled shifted tapes (shots)
        for parameter shift."""
        import autograd
        import pennylane as qml

        shots = self.shots if self.diff_method == "parameter-shift" else None
        device = self._device_for(seed) if shots is not None else self.device
        method = self.diff_method
        vjp_device = method == "adjoint"

        def f(angles: Any) -> Any:
            tapes = self.tapes(x, theta, shots, angles=angles)
            res = qml.execute(
                tapes, device, diff_method=method, interface="autograd", device_vjp=vjp_device
            )
            return autograd.numpy.stack([autograd.numpy.stack(list(r)) for r in res])

        angles = self.angles(np.asarray(x), np.asarray(theta)).astype(np.float64)
        vjp_fn, _ = autograd.make_vjp(f)(angles)
        grads = np.asarray(vjp_fn(np.asarray(g, np.float64)))  # (R, K)
        dx = np.zeros(x.shape, np.float64)
        dtheta = np.zeros(theta.shape, np.float64)
        for k, s in enumerate(self.slots):
            if s.array == "x":
                dx[:, s.index[0]] += grads[:, k]
            else:
                dtheta[(slice(None), *s.index)] += grads[:, k]
        return dx, dtheta

    def record(self) -> dict[str, Any]:
        """What a run records about its device (results.json): never a credential."""
        from importlib import metadata

        entry = _plugin_devices()[self.name]
        package = entry.dist.name if getattr(entry, "dist", None) else None
        version = None
        if package:
            try:
                version = metadata.version(package)
            except metadata.PackageNotFoundError:  # pragma: no cover
                version = None
        return {
            "name": self.name,
            "options": dict(self.options),
            "shots": self.shots,
            "diff_method": self.diff_method,
            "noise": "none"
            if self.noise is None
            else ("channels on the device" if self.channels else "readout on <Z>"),
            "plugin": package,
            "plugin_version": version,
        }


def _line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text[:300] or type(err).__name__


def _has_channels(noise: Any) -> bool:
    fields = ("depolarizing", "depolarizing_2q", "amplitude_damping", "phase_damping", "readout")
    return any((getattr(noise, f) or 0) > 0 for f in fields) or noise.device_model is not None


_PAULIS = (  # I, X, Y, Z
    np.eye(2, dtype=complex),
    np.array([[0, 1], [1, 0]], complex),
    np.array([[0, -1j], [1j, 0]]),
    np.diag([1.0, -1.0]).astype(complex),
)


@functools.lru_cache(maxsize=64)
def _two_qubit_depolarizing(p: float) -> tuple[np.ndarray, ...]:
    """Each of the 15 non-identity two-qubit Paulis with probability p/15."""
    paulis = _PAULIS
    kraus = [np.sqrt(1 - p) * np.eye(4, dtype=complex)]
    for a in range(4):
        for b in range(4):
            if (a, b) != (0, 0):
                kraus.append(np.sqrt(p / 15) * np.kron(paulis[a], paulis[b]))
    return tuple(kraus)


def _readout_kraus(a: float, b: float) -> list[np.ndarray]:
    """Measurement error P(1|0) = a, P(0|1) = b as a channel just before measuring."""
    return [
        np.diag([np.sqrt(1 - a), np.sqrt(1 - b)]).astype(complex),
        np.array([[0, 0], [np.sqrt(a), 0]], complex),
        np.array([[0, np.sqrt(b)], [0, 0]], complex),
    ]


def _channels(gate: str, wires: list[int], noise: Any) -> list[Any]:
    """The channels qtl places after ``gate`` (qtl.quantum.noise.channels' order)."""
    import pennylane as qml

    out: list[Any] = []
    reps = noise.pulses.get(gate, 1)
    if gate == "CNOT":
        ad, pd = noise.cnot_damping()
        for _ in range(reps):
            p2 = noise.pair(*wires)
            if p2 > 0:
                out.append(qml.QubitChannel(list(_two_qubit_depolarizing(float(p2))), wires=wires))
            for w in wires:
                out += _damping(w, ad[w], pd[w])
        return out
    w = wires[0]
    for _ in range(reps):
        if noise.depolarizing[w] > 0:
            out.append(qml.DepolarizingChannel(float(noise.depolarizing[w]), wires=w))
        out += _damping(w, noise.amplitude_damping[w], noise.phase_damping[w])
    return out


def _damping(w: int, ad: float, pd: float) -> list[Any]:
    import pennylane as qml

    out: list[Any] = []
    if ad > 0:
        out.append(qml.AmplitudeDamping(float(ad), wires=w))
    if pd > 0:
        out.append(qml.PhaseDamping(float(pd), wires=w))
    return out


def _seed(key_data: np.ndarray) -> int:
    data = np.asarray(key_data, np.uint32).reshape(-1, key_data.shape[-1])[0]
    return int(np.uint64(data[0]) << np.uint64(32) | np.uint64(data[-1])) % (2**31 - 1)


def device_circuit(
    spec: CircuitSpec, opts: Any, where: str = "head"
) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
    """``f(x (B, n), theta, key) -> <Z> (B, n)`` on ``opts.device``, callable inside jit."""
    run = runner(spec, opts, where)
    n, tshape = spec.n_qubits, spec.theta_shape

    def rows(x: np.ndarray, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple]:
        lead = x.shape[:-1]
        return (
            np.asarray(x, np.float64).reshape(-1, n),
            np.asarray(theta, np.float64).reshape(-1, *tshape),
            lead,
        )

    def host_forward(x: np.ndarray, theta: np.ndarray, key: np.ndarray) -> np.ndarray:
        xr, tr, lead = rows(x, theta)
        z = run.forward(xr, tr, _seed(key) if run.shots is not None else None)
        return z.astype(np.float32).reshape(*lead, n)

    def host_vjp(x, theta, g, key):
        xr, tr, lead = rows(x, theta)
        seed = None if run.shots is None else _seed(key) ^ 0x5EED
        dx, dt = run.vjp(xr, tr, np.asarray(g, np.float64).reshape(-1, n), seed)
        return dx.astype(np.float32).reshape(*lead, n), dt.astype(np.float32).reshape(
            *lead, *tshape
        )

    def call_forward(x, theta_b, key_data):
        shape = jax.ShapeDtypeStruct(x.shape, jnp.float32)
        return jax.pure_callback(
            host_forward, shape, x, theta_b, key_data, vmap_method="broadcast_all"
        )

    @jax.custom_vjp
    def f(x, theta, key_data):
        theta_b = jnp.broadcast_to(theta, (*x.shape[:-1], *tshape))
        return call_forward(x, theta_b, key_data)

    def fwd(x, theta, key_data):
        theta_b = jnp.broadcast_to(theta, (*x.shape[:-1], *tshape))
        return call_forward(x, theta_b, key_data), (x, theta_b, key_data)

    def bwd(res, g):
        x, theta_b, key_data = res
        shapes = (
            jax.ShapeDtypeStruct(x.shape, jnp.float32),
            jax.ShapeDtypeStruct(theta_b.shape, jnp.float32),
        )
        dx, dt = jax.pure_callback(
            host_vjp, shapes, x, theta_b, g.astype(jnp.float32), key_data,
            vmap_method="broadcast_all",
        )  # fmt: skip
        lead = tuple(range(x.ndim - 1))
        return dx.astype(x.dtype), dt.sum(axis=lead), None

    f.defvjp(fwd, bwd)
    readout = run.readout if not run.channels else None

    def circuit(x: jax.Array, theta: jax.Array, key: jax.Array) -> jax.Array:
        key_data = (
            jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
        )
        z = f(x.astype(jnp.float32), theta.astype(jnp.float32), key_data)
        if readout is not None:  # a device without channels: readout exactly on <Z>
            from qtl.quantum.noise.channels import apply_readout

            z = apply_readout(z, readout)
        return z.astype(x.dtype)

    return circuit
