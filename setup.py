from setuptools import find_packages, setup

with open("requirements.txt") as f:
  install_requires = [line.strip() for line in f if line.strip() and not line.startswith("#")]

setup(
    name="vlm_jax",
    version="0.1.0",
    description="JAX/Flax training and inference for PaliGemma-style vision-language models.",
    packages=find_packages(include=["vlm_jax", "vlm_jax.*"]),
    python_requires=">=3.10",
    install_requires=install_requires,
    extras_require={
        # torch is pinned exactly: that CPU build is what the test machines install offline-fast.
        "test": ["pytest>=8", "torch==2.13.0", "transformers>=5.0", "scipy>=1.10", "tensorflow-datasets>=4.9.10",
                 "importlib_resources"],
        # TFDS sources (ArrayRecord datasets; no TensorFlow needed).
        "tfds": ["tensorflow-datasets>=4.9.10", "importlib_resources"],
    },
)
