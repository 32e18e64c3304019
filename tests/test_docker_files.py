"""Static checks for docker/Dockerfile, docker/compose.yaml and docker/rayjob.yaml.

No Docker engine runs on the development machines, so these files cannot be
built here. These tests catch the ways they usually break: YAML that no longer
parses, COPY sources that were renamed or removed, version pins that drift
apart from each other or from pyproject.toml, and commands that name a console
script or config file that does not exist. Pure file parsing; no Docker, no
network.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
COMPOSE = DOCKER / "compose.yaml"
RAYJOB = DOCKER / "rayjob.yaml"

CONFIG_REL = "launcher/configs/gpt_tiny.toml"  # relative to the repo root
IMAGE_WORKDIR = "/app"  # WORKDIR in the Dockerfile; the repo root is copied here
CONFIG_IN_IMAGE = f"{IMAGE_WORKDIR}/{CONFIG_REL}"


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pyproject() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def _all_requirements(pyproject: dict) -> list[Requirement]:
    project = pyproject["project"]
    reqs = [Requirement(r) for r in project.get("dependencies", [])]
    for extra in project.get("optional-dependencies", {}).values():
        reqs += [Requirement(r) for r in extra]
    return reqs


def _lower_bound(pyproject: dict, name: str) -> Version:
    """The `>=X` bound on `name` in pyproject's dependencies or extras."""
    bounds = [
        Version(spec.version)
        for req in _all_requirements(pyproject)
        if req.name == name
        for spec in req.specifier
        if spec.operator == ">="
    ]
    assert bounds, f"no '{name}>=X' requirement in pyproject.toml"
    return max(bounds)


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with comments and line continuations resolved."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):  # comment inside a continuation
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            keyword, _, args = full.partition(" ")
            instructions.append((keyword.upper(), args.strip()))
    assert not pending, "Dockerfile ends inside a line continuation"
    return instructions


def _dockerfile_args() -> dict[str, str]:
    """Default values of every `ARG NAME=value` in the Dockerfile."""
    args: dict[str, str] = {}
    for keyword, rest in _dockerfile_instructions():
        if keyword == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            args[name.strip()] = value.strip().strip("\"'")
    return args


def _copy_instructions() -> list[tuple[list[str], str]]:
    """(sources, destination) of each COPY/ADD from the build context."""
    copies = []
    for keyword, rest in _dockerfile_instructions():
        if keyword not in ("COPY", "ADD"):
            continue
        if rest.startswith("["):  # exec (JSON) form
            words = json.loads(rest)
            flags = []
        else:
            words = shlex.split(rest)
            flags = [w for w in words if w.startswith("--")]
            words = [w for w in words if not w.startswith("--")]
        if any(f.startswith("--from") for f in flags):
            continue  # copied from another stage or image, not the context
        assert len(words) >= 2, f"{keyword} needs a source and a destination: {rest!r}"
        copies.append((words[:-1], words[-1]))
    return copies


@pytest.fixture(scope="module")
def compose() -> dict:
    with open(COMPOSE) as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def rayjob_docs() -> list[dict]:
    with open(RAYJOB) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


@pytest.fixture(scope="module")
def rayjob(rayjob_docs) -> dict:
    jobs = [d for d in rayjob_docs if d.get("kind") == "RayJob"]
    assert len(jobs) == 1, "rayjob.yaml should hold exactly one RayJob"
    return jobs[0]


def _compose_submit_command() -> list[str]:
    """The `sharded-ams ...` command shown in compose.yaml's header comment."""
    for line in COMPOSE.read_text().splitlines():
        if line.startswith("#") and "exec ray-head sharded-ams" in line:
            words = shlex.split(line.lstrip("# "))
            return words[words.index("sharded-ams") :]
    pytest.fail("compose.yaml has no '# ... exec ray-head sharded-ams ...' example comment")


def _pod_specs(rayjob: dict) -> dict[str, dict]:
    cluster = rayjob["spec"]["rayClusterSpec"]
    specs = {"head": cluster["headGroupSpec"]["template"]["spec"]}
    for group in cluster["workerGroupSpecs"]:
        specs[group["groupName"]] = group["template"]["spec"]
    return specs


def _flag_value(words: list[str], flag: str) -> str:
    assert flag in words, f"missing {flag} in {' '.join(words)}"
    return words[words.index(flag) + 1]


# --------------------------------------------------------------------------
# Dockerfile
# --------------------------------------------------------------------------


def test_dockerfile_copy_sources_exist():
    copies = _copy_instructions()
    assert copies, "Dockerfile copies nothing from the build context"
    missing = [src for sources, _ in copies for src in sources if not (ROOT / src).exists()]
    assert not missing, f"COPY sources missing from the repository root: {missing}"


def test_dockerfile_copies_directories_to_named_destinations():
    # `COPY dir1 dir2 ./` copies the *contents* of the directories into ./,
    # flattening the packages; each directory must go to a destination named after it.
    for sources, dest in _copy_instructions():
        for src in sources:
            if (ROOT / src).is_dir():
                assert len(sources) == 1, f"copy directory {src!r} in its own COPY"
                assert dest.rstrip("/").endswith(src.rstrip("/")), (
                    f"COPY {src} {dest} would flatten {src}/ into {dest}"
                )


def test_dockerfile_copies_what_pip_install_needs(pyproject):
    copied = {Path(src).as_posix().rstrip("/") for sources, _ in _copy_instructions() for src in sources}
    assert "pyproject.toml" in copied
    readme = pyproject["project"].get("readme")
    if isinstance(readme, str):
        assert readme in copied, f"pyproject declares readme {readme!r}; the build needs it"
    for pattern in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]:
        top = pattern.rstrip("*").split(".")[0]
        assert top in copied, f"package {top!r} (from packages.find.include) is not copied"


def test_dockerfile_base_and_workdir():
    instructions = _dockerfile_instructions()
    froms = [rest for kw, rest in instructions if kw == "FROM"]
    assert len(froms) == 1
    assert froms[0].startswith("rayproject/ray:${RAY_VERSION}"), froms[0]
    assert froms[0].endswith("-gpu"), "use the Ray GPU image"
    workdirs = [rest for kw, rest in instructions if kw == "WORKDIR"]
    assert workdirs and workdirs[-1] == IMAGE_WORKDIR


def test_dockerfile_installs_pinned_torch_and_the_package():
    runs = " ".join(rest for kw, rest in _dockerfile_instructions() if kw == "RUN")
    assert "torch==${TORCH_VERSION}" in runs
    assert "${TORCH_INDEX_URL}" in runs
    assert re.search(r"pip install [^;&]*\.\[ray,triton\]", runs), "pip install .[ray,triton] missing"


def test_dockerfile_ray_version_satisfies_pyproject(pyproject):
    ray_version = Version(_dockerfile_args()["RAY_VERSION"])
    assert ray_version >= _lower_bound(pyproject, "ray")


def test_dockerfile_torch_version_satisfies_pyproject(pyproject):
    torch_version = Version(_dockerfile_args()["TORCH_VERSION"])
    assert torch_version >= _lower_bound(pyproject, "torch")


def test_dockerfile_cmd_uses_console_script(pyproject):
    cmds = [rest for kw, rest in _dockerfile_instructions() if kw == "CMD"]
    assert cmds, "Dockerfile has no CMD"
    cmd = json.loads(cmds[-1])
    assert cmd[0] in pyproject["project"]["scripts"]


# --------------------------------------------------------------------------
# compose.yaml
# --------------------------------------------------------------------------


def test_compose_services(compose):
    services = compose["services"]
    assert {"ray-head", "ray-worker-1", "ray-worker-2"} <= set(services)
    head_cmd = services["ray-head"]["command"]
    assert "--head" in head_cmd and "--port=6379" in head_cmd and "--block" in head_cmd
    for name in ("ray-worker-1", "ray-worker-2"):
        cmd = services[name]["command"]
        assert "--address=ray-head:6379" in cmd, f"{name} does not join ray-head:6379"
        assert "--block" in cmd


def test_compose_build_points_at_dockerfile(compose):
    services = compose["services"]
    builds = [svc["build"] for svc in services.values() if "build" in svc]
    assert builds, "no service builds the image"
    for build in builds:
        context = (COMPOSE.parent / build["context"]).resolve()
        assert context == ROOT, "build context must be the repository root"
        assert (context / build["dockerfile"]).resolve() == DOCKERFILE
    images = {svc.get("image") for svc in services.values()}
    assert len(images) == 1 and None not in images, f"all nodes should run one image: {images}"


def test_compose_shared_volume_and_env(compose):
    assert "ray-shared" in (compose.get("volumes") or {})
    for name in ("ray-head", "ray-worker-1", "ray-worker-2"):
        svc = compose["services"][name]
        assert "ray-shared:/shared" in svc["volumes"], f"{name} lacks the /shared volume"
        env = svc["environment"]
        if isinstance(env, list):
            env = dict(e.split("=", 1) for e in env)
        assert env.get("RAY_AUTH_MODE") == "disabled"
        assert svc.get("shm_size") == "2gb"


def test_compose_submit_example(pyproject):
    words = _compose_submit_command()
    assert words[0] in pyproject["project"]["scripts"]
    assert words[1] == "train"
    assert words[2] == CONFIG_IN_IMAGE
    assert _flag_value(words, "--address") == "auto"
    assert _flag_value(words, "--storage-path").startswith("/shared/")


# --------------------------------------------------------------------------
# rayjob.yaml
# --------------------------------------------------------------------------


def test_rayjob_documents(rayjob_docs, rayjob):
    assert rayjob["apiVersion"] == "ray.io/v1"
    assert rayjob["spec"]["shutdownAfterJobFinishes"] is True
    pvcs = [d for d in rayjob_docs if d.get("kind") == "PersistentVolumeClaim"]
    assert len(pvcs) == 1
    assert pvcs[0]["metadata"]["name"] == "sharded-ams-ckpt"
    assert "ReadWriteMany" in pvcs[0]["spec"]["accessModes"]


def test_rayjob_ray_version_matches_dockerfile(rayjob, pyproject):
    ray_version = str(rayjob["spec"]["rayClusterSpec"]["rayVersion"])
    assert ray_version == _dockerfile_args()["RAY_VERSION"]
    assert Version(ray_version) >= _lower_bound(pyproject, "ray")


def test_rayjob_entrypoint(rayjob, pyproject):
    words = shlex.split(rayjob["spec"]["entrypoint"])
    assert words[0] in pyproject["project"]["scripts"], f"{words[0]!r} is not a console script"
    assert words[1] == "train"
    assert words[2] == CONFIG_IN_IMAGE
    assert _flag_value(words, "--address") == "auto"
    assert "--gpus" in words
    assert _flag_value(words, "--storage-path").startswith("/mnt/ckpt/")
    workers = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpu_replicas = sum(g["replicas"] for g in workers)
    assert int(_flag_value(words, "--num-workers")) == gpu_replicas


def test_rayjob_pods(rayjob, compose):
    image = compose["services"]["ray-head"]["image"]
    workers = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert len(workers) == 1 and workers[0]["replicas"] == 4
    for group, spec in _pod_specs(rayjob).items():
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in spec["volumes"]
            if "persistentVolumeClaim" in v
        }
        assert "sharded-ams-ckpt" in claims.values(), f"{group} does not use the PVC"
        (container,) = spec["containers"]
        assert container["image"] == image, f"{group} image differs from compose's"
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert claims.get(mounts.get("/mnt/ckpt")) == "sharded-ams-ckpt", f"{group}: /mnt/ckpt"
        if group != "head":
            assert container["resources"]["limits"]["nvidia.com/gpu"] == 1


# --------------------------------------------------------------------------
# the launcher config both commands name
# --------------------------------------------------------------------------


def test_commands_name_the_gpt_tiny_config(rayjob):
    # Both commands point into the image's copy of the repo; check the
    # repo-relative part so a renamed config shows up here.
    assert CONFIG_IN_IMAGE == f"{IMAGE_WORKDIR}/{CONFIG_REL}"
    assert CONFIG_REL == "launcher/configs/gpt_tiny.toml"
    assert _compose_submit_command()[2].removeprefix(IMAGE_WORKDIR + "/") == CONFIG_REL
    assert shlex.split(rayjob["spec"]["entrypoint"])[2].removeprefix(IMAGE_WORKDIR + "/") == CONFIG_REL


def test_gpt_tiny_config_exists():
    assert (ROOT / CONFIG_REL).is_file(), f"{CONFIG_REL} (named in compose.yaml and rayjob.yaml) is missing"
