"""Where a frozen network's forward pass runs, and how: the device, its precision, XLA, how pixels
travel to it and how many images go per call.

`plan_device(compute, batch_size)` resolves the `compute` section's `device`, `precision`, `xla`,
`pixels` and `device_batch_size` (each `auto` by default) into a `DevicePlan`:

- on the CPU (`auto` there): float32, no XLA (slower than a plain `tf.function` on these CPUs, see
  ../shared/NOTES.md), float32 pixels preprocessed in the input pipeline, the stage's own batch size:
  exactly the path precompute has always taken, so cached features stay bit for bit the same;
- on a GPU: mixed precision (`mixed_bfloat16` where the GPU computes in bfloat16, compute
  capability 8.0 and up; `mixed_float16` before), the forward pass compiled with XLA once for one
  batch shape (the last batch is padded, so nothing recompiles), uint8 pixels shipped to the device
  (4x fewer bytes than float32; rounded after resizing) and cast and preprocessed there, batches
  prefetched onto the device, and a batch size chosen from the device's free memory.

Every choice can be forced (`--set compute.xla=true` ...): the tests run the GPU's path on the CPU.
What a GPU computes is close to, not bit for bit, the CPU's (bfloat16 keeps 8 bits of mantissa):
the stage's `meta.json` records the plan it ran with. Imports TensorFlow inside the functions only.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass

from pipeline.core.errors import PipelineError

BFLOAT16_CAPABILITY = (8, 0)  # Ampere and later compute in bfloat16
MEMORY_FRACTION = 0.5  # of the GPU's free memory a forward pass may plan to use (the rest: XLA's scratch, other tasks)
PROBE_BATCHES = (16, 32)  # two batch sizes whose peak memory gives the cost of one more image
BATCH_RANGE = (16, 1024)  # an automatic batch size stays within these, a power of two


@dataclass(frozen=True)
class DevicePlan:
    """How one forward pass runs (recorded in the stage's `meta.json`)."""

    device: str  # a TensorFlow device name: "/CPU:0", "/GPU:0"
    description: str  # "NVIDIA H200, compute capability 9.0" / "CPU, 2 cores"
    precision: str  # a Keras dtype policy: float32 | mixed_float16 | mixed_bfloat16
    xla: bool  # compiled with XLA, for one batch shape (the last batch padded)
    pixels: str  # float32 (preprocessed in the input pipeline) | uint8 (cast and preprocessed on the device)
    batch_size: int | None  # images per call; None: chosen from the GPU's memory (`choose_batch_size`)

    @property
    def prefetch(self) -> bool:
        """uint8 pixels are shipped to the device: batches are copied onto it ahead of the call that needs them."""
        return self.pixels == "uint8"

    @property
    def on_gpu(self) -> bool:
        return "GPU" in self.device

    def record(self) -> dict:
        return asdict(self)


def configure_gpus() -> list:
    """TensorFlow's GPUs, with memory growth on (several processes or small trainings can share one).

    Returns:
        The visible GPUs (empty on a CPU-only machine). Must run before TensorFlow first touches a
        GPU; after that memory growth cannot change, and is left as it is.
    """
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        with contextlib.suppress(RuntimeError, ValueError):  # already initialised: keep its setting
            tf.config.experimental.set_memory_growth(gpu, True)
    return gpus


def plan_device(compute, batch_size: int) -> DevicePlan:
    """Resolve the `compute` section's device settings for this process.

    Args:
        compute: the `compute` section (`device`, `precision`, `xla`, `pixels`, `device_batch_size`),
            or None: every setting `auto`.
        batch_size: the stage's own batch size (used on the CPU, and on a GPU unless `auto`).

    Returns:
        A `DevicePlan`. Raises PipelineError when `device: gpu` is asked for and none is visible.
    """
    import tensorflow as tf

    setting = (lambda name: getattr(compute, name)) if compute is not None else (lambda name: "auto")
    gpus = configure_gpus()
    if setting("device") == "gpu" and not gpus:
        raise PipelineError("compute.device is gpu, but TensorFlow sees no GPU here "
                            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    on_gpu = bool(gpus) and setting("device") != "cpu"
    if on_gpu:
        details = tf.config.experimental.get_device_details(gpus[0])
        capability = tuple(details.get("compute_capability") or (0, 0))
        description = f"{details.get('device_name', 'GPU')}, compute capability {capability[0]}.{capability[1]}"
        precision = "mixed_bfloat16" if capability >= BFLOAT16_CAPABILITY else "mixed_float16"
    else:
        description, precision = f"CPU, {os.cpu_count()} cores", "float32"

    def chosen(name: str, automatic):
        value = setting(name)
        return automatic if value == "auto" else value

    device_batch = setting("device_batch_size")
    return DevicePlan(
        device="/GPU:0" if on_gpu else "/CPU:0",
        description=description,
        precision=chosen("precision", precision),
        xla=chosen("xla", on_gpu),
        pixels=chosen("pixels", "uint8" if on_gpu else "float32"),
        batch_size=(None if device_batch == "auto" else device_batch) if on_gpu else batch_size,
    )


@contextlib.contextmanager
def precision_scope(policy: str):
    """Build layers under the Keras dtype policy `policy`, then restore the previous global one."""
    import keras

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def batch_for_memory(fixed_bytes: float, per_image_bytes: float, budget_bytes: float,
                     low: int = BATCH_RANGE[0], high: int = BATCH_RANGE[1]) -> int:
    """The largest power of two of images whose forward pass fits `budget_bytes`.

    Args:
        fixed_bytes: memory a call needs whatever its batch (weights, workspace).
        per_image_bytes: memory each more image adds (activations).
        budget_bytes: what the call may use.
        low, high: the range the answer is clamped to.

    Returns:
        A power of two in [low, high].
    """
    fits = (budget_bytes - fixed_bytes) / max(per_image_bytes, 1.0)
    batch = low
    while batch * 2 <= min(fits, high):
        batch *= 2
    return batch


def gpu_memory_budget(device: str = "GPU:0") -> float:
    """Bytes the forward pass may plan on: `MEMORY_FRACTION` of the GPU's total memory minus what
    TensorFlow holds already (read from the driver through `nvidia-smi` when it is there; else 8 GiB)."""
    import subprocess

    import tensorflow as tf

    total = 8 * 2**30
    with contextlib.suppress(OSError, ValueError, subprocess.SubprocessError):
        index = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0"
        answer = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits",
                                 "-i", index], capture_output=True, text=True, timeout=20, check=True)
        total = float(answer.stdout.strip().splitlines()[0]) * 2**20
    held = tf.config.experimental.get_memory_info(device)["current"]
    return MEMORY_FRACTION * total - held


def choose_batch_size(forward_at, device: str = "GPU:0") -> int:
    """Measure a forward pass's peak memory at two batch sizes and pick the largest that fits.

    Args:
        forward_at: `forward_at(batch)` runs the forward pass once on a batch of that many images.
        device: the GPU, as `tf.config.experimental.get_memory_info` names it.

    Returns:
        Images per call (`batch_for_memory` of the measured costs and `gpu_memory_budget`).
    """
    import tensorflow as tf

    peaks = []
    for batch in PROBE_BATCHES:
        tf.config.experimental.reset_memory_stats(device)
        forward_at(batch)
        peaks.append(tf.config.experimental.get_memory_info(device)["peak"])
    per_image = max((peaks[1] - peaks[0]) / (PROBE_BATCHES[1] - PROBE_BATCHES[0]), 1.0)
    fixed = max(peaks[0] - per_image * PROBE_BATCHES[0], 0.0)
    return batch_for_memory(fixed, per_image, gpu_memory_budget(device))


@contextlib.contextmanager
def replicas_scope(plan: DevicePlan, device_type: str | None = None):
    """Build and train under a single-host `tf.distribute.MirroredStrategy` when the plan is on a GPU and
    several are visible (one replica each; every batch is split among them and the gradients summed);
    otherwise nothing changes. Multi-worker strategies are not used: broken with Keras 3 on
    TensorFlow (keras-team/keras#20585).

    Args:
        plan: the device plan.
        device_type: whose logical devices become replicas (default: "GPU" on a GPU plan, else none;
            the tests use "CPU" with two logical CPUs).

    Yields:
        The number of replicas.
    """
    import tensorflow as tf

    device_type = device_type or ("GPU" if plan.on_gpu else None)
    devices = tf.config.list_logical_devices(device_type) if device_type else []
    if len(devices) < 2:
        yield 1
        return
    strategy = tf.distribute.MirroredStrategy([device.name for device in devices])
    with strategy.scope():
        yield strategy.num_replicas_in_sync
