"""rlhf_jax: a JAX framework for the whole RLHF pipeline."""
import pathlib

import setuptools

_HERE = pathlib.Path(__file__).parent


def _requirements(name):
  lines = (_HERE / name).read_text().splitlines()
  return [l.strip() for l in lines if l.strip() and not l.startswith("#")]


setuptools.setup(
    name="rlhf_jax",
    version="0.1.0",
    description="Pure-functional JAX/Flax RLHF: SFT, reward models, DPO family, PPO.",
    long_description=(_HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["rlhf_jax", "rlhf_jax.*"]),
    package_data={"rlhf_jax.collect": ["page.js"]},  # The annotation page's script.
    python_requires=">=3.11",
    install_requires=_requirements("requirements.txt"),
    extras_require={"test": _requirements("requirements-test.txt")},
)
