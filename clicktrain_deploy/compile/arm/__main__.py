"""``python -m clicktrain_deploy.compile.arm``: fetch the aarch64 TVM runtime and build the runner."""
from . import setup_arm

print(f"aarch64 runner ready in {setup_arm()}")
