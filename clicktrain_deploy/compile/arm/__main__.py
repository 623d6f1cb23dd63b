"""``python -m clicktrain_deploy.compile.arm``: fetch the aarch64 TVM runtime and build the runner,
then unpack onnxruntime's own aarch64 build (aarch64 CPython + wheels) for comparison runs.
Idempotent: each part is skipped when it is already in place."""
from . import arm_available, arm_root, setup_arm
from .ort import setup_ort_arm

if not arm_available():
    setup_arm()
print(f"aarch64 runner ready in {arm_root()}")
done = setup_ort_arm()
print(f"aarch64 onnxruntime {done['wanted']['onnxruntime']} ready in {arm_root() / 'ort'} "
      f"({done['downloaded_bytes'] / 1e6:.1f} MB downloaded, {done['disk_bytes'] / 1e6:.0f} MB on disk, "
      f"setup {done['setup_s']} s)")
