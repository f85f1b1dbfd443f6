"""kexue-jax: GAU/FLASH, diffusion and the losses of Scientific Spaces (kexue.fm) in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="kexue-jax",
    version="0.1.0",
    description="JAX/Flax research code for the ideas of Su Jianlin's Scientific Spaces posts.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["models", "models.*", "losses", "losses.*", "train_lib", "train_lib.*",
                                    "experiments", "experiments.*"]),
    python_requires=">=3.11",
    # The base install is what `losses/` and `models/` need: another project can `pip install kexue-jax` for
    # the losses and modules without the training stack.
    install_requires=[
        "jax>=0.10,<0.11",
        "flax>=0.12,<0.13",
        "optax>=0.2.8,<0.3",
        "chex>=0.1.92,<0.2",
        "numpy>=2.0,<3",
    ],
    extras_require={
        # The training stack (train_lib/, experiments/): checkpoints, configs, input pipelines, logs, plots.
        "train": [
            "orbax-checkpoint>=0.12,<0.13",
            "ml_collections>=1.1,<2",
            "grain>=0.2.18,<0.3",
            "absl-py>=2.1,<3",
            "tqdm>=4.66,<5",
            "tensorboardX>=2.6,<3",
            "scikit-learn>=1.5,<2",
            "scipy>=1.13,<2",
            "matplotlib>=3.9,<4",
            "pillow>=10",
        ],
        # The text family (train_lib/text/, models.pretrained): tokenizers, safetensors for Hugging Face weights, and
        # the PyPI packages whose files hold the embedded Chinese text (read as data; jionlp is never imported).
        "text": [
            "tokenizers>=0.21,<0.24",
            "sentencepiece>=0.2,<0.3",
            "safetensors>=0.4,<0.9",
            "jieba>=0.42,<0.43",
            "snownlp>=0.12,<0.13",
            "jionlp>=1.5,<1.6",
        ],
        # Compiling for TPU pods ahead of time on any machine (train_lib/pods.py: libtpu describes the chips of a
        # topology without a TPU attached); also what a TPU VM installs to train. constraints.txt pins libtpu.
        "tpu": ["jax[tpu]>=0.10,<0.11"],
        "test": ["pytest>=8,<10", "pytest-xdist>=3.6,<4", "hypothesis>=6.100,<7", "portpicker>=1.6,<2",
                 "wheel>=0.43"],
    },
)
