#!/usr/bin/env bash
# gpu_wheels.sh -- carry pdserve's missing Python wheels to the lent GPU machine.
#
# The GPU machine (Python 3.12, torch, triton, transformers, msgpack, httpx,
# aiohttp, uvloop, prometheus-client) lacks pyzmq, msgspec, fastapi, starlette, uvicorn,
# httptools, pydantic and their small dependencies, and it reaches no package registry.
# So the wheels are downloaded here into the git-ignored folder .whl/ at the
# repo root, travel with the working tree (the run tool's carry: [".whl"]),
# and are installed there into a private folder put on PYTHONPATH.
#
# Usage:
#   bash scripts/gpu_wheels.sh fetch     # dev machine: download the pinned wheels into .whl/
#   bash scripts/gpu_wheels.sh check     # dev machine: verify .whl/ (one wheel per pin,
#                                        #   cp312 manylinux x86_64 tags, closed dependency set)
#   eval "$(bash scripts/gpu_wheels.sh install [--target DIR])"
#                                        # GPU machine, first thing in every run
#
# install puts the wheels into DIR (default /tmp/site), imports every module the
# GPU runs need and prints a version table on stderr. On stdout it prints one
# line only:  export PYTHONPATH=DIR${PYTHONPATH:+:$PYTHONPATH}
# On any failure it prints `false` instead, so `eval "$(...)"` fails too
# (and stops a `set -e` script).
#
# Environment: PYTHON (default python3) is the interpreter used by every mode.
set -euo pipefail

# name==version pins. Every runtime dependency (Requires-Dist without an extra,
# markers evaluated for CPython 3.12 on linux x86_64) of these wheels is itself
# pinned here; `check` verifies that. Versions match the dev .venv.
PINS=(
  pyzmq==27.3.0
  msgspec==0.23.0            # typed wire messages (common/wire.py); no dependencies
  fastapi==0.165.0
  starlette==1.10.0
  uvicorn==0.54.0
  pydantic==2.14.3
  pydantic-core==2.50.4      # pydantic 2.14.3 pins exactly this
  # fastapi
  annotated-doc==0.0.7
  opentelemetry-api==1.45.2  # fastapi >= 0.16x requires it
  # pydantic
  annotated-types==0.8.0
  typing-inspection==0.4.5
  typing-extensions==4.16.0  # pydantic-core needs >= 4.16; the image's may be older
  # starlette / fastapi
  anyio==4.16.0
  idna==3.20
  sniffio==1.3.1             # no longer required by anyio 4.16; kept for older httpx stacks
  # uvicorn
  click==8.5.1
  h11==0.16.0
  httptools==0.9.0           # the proxy's HTTP parser (pdserve serve; uvloop: the image's)
  llguidance==1.6.1          # structured outputs; the newest with a manylinux_2_28 wheel
)

# Modules the GPU runs import (checked by `install`); the last ones come with the image.
IMPORTS=(zmq msgspec fastapi starlette uvicorn pydantic pydantic_core anyio click h11 llguidance
         httptools httpx prometheus_client torch triton transformers)

MAX_BYTES=$((30 * 1024 * 1024))

PYTHON=${PYTHON:-python3}
CALLER_PWD=$PWD
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WHL="$ROOT/.whl"
cd "$ROOT"

usage() {
  cat >&2 <<'EOF'
usage: bash scripts/gpu_wheels.sh fetch
       bash scripts/gpu_wheels.sh check
       eval "$(bash scripts/gpu_wheels.sh install [--target DIR])"
  fetch    download the pinned CPython 3.12 manylinux x86_64 wheels into .whl/ (needs PyPI)
  check    verify .whl/ holds exactly the pinned wheels, with compatible tags
  install  install .whl/*.whl into DIR (default /tmp/site), check the imports,
           print `export PYTHONPATH=DIR...` on stdout (versions on stderr)
EOF
  exit 2
}

die() { echo "gpu_wheels: error: $*" >&2; exit 1; }

# Helper in Python (stdlib only, except `check`, which uses packaging or pip's copy).
read -r -d '' HELPER <<'PYEOF' || true
import os, re, sys, zipfile

def canon(n):
    return re.sub(r"[-_.]+", "-", n).lower()

def parse_pins(args):
    pins = {}
    for a in args:
        n, v = a.split("==")
        pins[canon(n)] = v
    return pins

def wheel_info(fn):
    base = os.path.basename(fn)
    parts = base[:-4].split("-")
    if not base.endswith(".whl") or len(parts) not in (5, 6):
        raise SystemExit(f"not a wheel file name: {base}")
    return canon(parts[0]), parts[1], parts[-3], parts[-2], parts[-1]

def wheels(d):
    return sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".whl"))

def prune(d, pins):
    """Remove wheels whose name is not pinned or whose version differs from the pin."""
    for w in wheels(d):
        n, v = wheel_info(w)[:2]
        if pins.get(n) != v:
            print(f"removed stale {os.path.basename(w)}", file=sys.stderr)
            os.remove(w)

def summary(d):
    total = 0
    for w in wheels(d):
        s = os.path.getsize(w)
        total += s
        print(f"  {s/1024:9.1f} KiB  {os.path.basename(w)}")
    print(f"  {total/1048576:9.2f} MiB  total, {len(wheels(d))} wheels in {d}")
    return total

def missing(d, pins):
    have = {wheel_info(w)[0]: wheel_info(w)[1] for w in wheels(d)}
    return [f"{n}=={v}" for n, v in pins.items() if have.get(n) != v]

def check(d, pins, max_bytes):
    try:
        from packaging import requirements, specifiers, tags, utils
    except ImportError:
        from pip._vendor.packaging import requirements, specifiers, tags, utils
    errors = []
    ws = wheels(d)
    # exactly one wheel per pin
    seen = {}
    for w in ws:
        n, v = wheel_info(w)[:2]
        seen.setdefault(n, []).append(os.path.basename(w))
        if n not in pins:
            errors.append(f"unpinned wheel {os.path.basename(w)}")
        elif pins[n] != v:
            errors.append(f"{os.path.basename(w)}: version {v}, pinned {pins[n]}")
    for n, fs in seen.items():
        if len(fs) > 1:
            errors.append(f"{n}: {len(fs)} wheels: {', '.join(fs)}")
    for m in missing(d, pins):
        errors.append(f"missing wheel for {m}")
    # tags: CPython 3.12, manylinux (glibc <= 2.28) x86_64, or pure
    plats = [f"manylinux_2_{m}_x86_64" for m in range(28, 4, -1)]
    plats += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
    ok = set(tags.cpython_tags((3, 12), abis=["cp312"], platforms=plats))
    ok |= set(tags.compatible_tags((3, 12), "cp312", plats))
    for w in ws:
        wtags = utils.parse_wheel_filename(os.path.basename(w))[3]
        if not (set(wtags) & ok):
            errors.append(f"{os.path.basename(w)}: no tag usable by CPython 3.12 manylinux x86_64")
    # dependency closure: every Requires-Dist (no extra) for cp312 linux x86_64 is pinned
    env = {"python_version": "3.12", "python_full_version": "3.12.3",
           "implementation_name": "cpython", "platform_python_implementation": "CPython",
           "implementation_version": "3.12.3", "sys_platform": "linux", "os_name": "posix",
           "platform_system": "Linux", "platform_machine": "x86_64", "extra": ""}
    versions = {wheel_info(w)[0]: wheel_info(w)[1] for w in ws}
    for w in ws:
        with zipfile.ZipFile(w) as z:
            meta = [f for f in z.namelist()
                    if f.count("/") == 1 and f.endswith(".dist-info/METADATA")]
            text = z.read(meta[0]).decode("utf-8")
        for line in text.splitlines():
            if not line:
                break  # end of headers
            if line.startswith("Requires-Python:"):
                spec = line.split(":", 1)[1].strip()
                if spec and not specifiers.SpecifierSet(spec).contains("3.12"):
                    errors.append(f"{os.path.basename(w)}: Requires-Python {spec}")
            if not line.startswith("Requires-Dist:"):
                continue
            req = requirements.Requirement(line.split(":", 1)[1].strip())
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            n = canon(req.name)
            if n not in versions:
                errors.append(f"{os.path.basename(w)} requires {req}: not in .whl/ (add it to PINS)")
            elif not req.specifier.contains(versions[n], prereleases=True):
                errors.append(f"{os.path.basename(w)} requires {req}, pinned {n}=={versions[n]}")
    total = sum(os.path.getsize(w) for w in ws)
    if total > max_bytes:
        errors.append(f"total {total/1048576:.1f} MiB > {max_bytes/1048576:.0f} MiB")
    return errors

def unpack(target, ws):
    """Install wheels without pip: unzip, mapping *.data/{purelib,platlib} to the root."""
    for w in ws:
        with zipfile.ZipFile(w) as z:
            for info in z.infolist():
                name = info.filename
                m = re.match(r"[^/]+\.data/(purelib|platlib)/(.*)", name)
                if m:
                    name = m.group(2)
                elif re.match(r"[^/]+\.data/", name):
                    continue  # scripts, headers, data: not needed for imports
                if not name or name.endswith("/"):
                    continue
                dest = os.path.join(target, name)
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                with z.open(info) as src, open(dest, "wb") as out:
                    out.write(src.read())

DISTS = {"zmq": "pyzmq", "pydantic_core": "pydantic-core",
         "prometheus_client": "prometheus-client"}

def imports(target, mods, pins):
    import importlib, importlib.metadata as md
    bad = []
    print(f"{'module':<18} {'version':<14} from", file=sys.stderr)
    for m in mods:
        try:
            mod = importlib.import_module(m)
        except Exception as e:  # noqa: BLE001 - report every failure
            bad.append(m)
            print(f"{m:<18} {'MISSING':<14} {type(e).__name__}: {e}", file=sys.stderr)
            continue
        try:
            v = md.version(DISTS.get(m, m))
        except md.PackageNotFoundError:
            v = getattr(mod, "__version__", None) or "?"
        f = os.path.abspath(getattr(mod, "__file__", None) or "?")
        top = os.path.abspath(target) + os.sep
        tag = "wheel" if f.startswith(top) else os.path.dirname(os.path.dirname(f))
        print(f"{m:<18} {str(v):<14} {tag}", file=sys.stderr)
    for n, v in pins.items():
        try:
            got = md.version(n)
        except md.PackageNotFoundError:
            got = None
        if got != v:
            bad.append(f"{n}=={v} (found {got})")
    if bad:
        print("gpu_wheels: error: failed: " + ", ".join(bad), file=sys.stderr)
        sys.exit(1)

cmd, args = sys.argv[1], sys.argv[2:]
if cmd == "prune":
    prune(args[0], parse_pins(args[1:]))
elif cmd == "summary":
    summary(args[0])
elif cmd == "missing":
    print("\n".join(missing(args[0], parse_pins(args[1:]))))
elif cmd == "check":
    errs = check(args[0], parse_pins(args[2:]), int(args[1]))
    for e in errs:
        print(f"gpu_wheels: check: {e}", file=sys.stderr)
    sys.exit(1 if errs else 0)
elif cmd == "unpack":
    unpack(args[0], args[1:])
elif cmd == "imports":
    sep = args.index("--")
    imports(args[0], args[1:sep], parse_pins(args[sep + 1:]))
else:
    raise SystemExit(f"unknown helper command {cmd}")
PYEOF

helper() { "$PYTHON" -c "$HELPER" "$@"; }

do_fetch() {
  mkdir -p "$WHL"
  local log
  log=$(mktemp)
  if ! "$PYTHON" -m pip download --no-deps --only-binary=:all: \
      --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform manylinux1_x86_64 \
      -d "$WHL" "${PINS[@]}" >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    die "pip download failed"
  fi
  grep -E '^(Saved|File was already downloaded)' "$log" | sed 's/^/  /' || true
  rm -f "$log"
  helper prune "$WHL" "${PINS[@]}"
  echo "fetched into .whl/:"
  helper summary "$WHL"
  do_check
}

do_check() {
  [[ -d $WHL ]] || die ".whl/ is missing: run 'bash scripts/gpu_wheels.sh fetch'"
  helper check "$WHL" "$MAX_BYTES" "${PINS[@]}" \
    || die ".whl/ failed the check (see above); 'bash scripts/gpu_wheels.sh fetch' repairs it"
  echo "check: .whl/ OK (${#PINS[@]} pinned wheels, cp312 manylinux x86_64, dependencies closed)"
}

do_install() {
  # From here on, a failure prints `false` on stdout, so that eval fails as well.
  exec 3>&1 1>&2   # keep fd 3 for the one line on stdout; all else to stderr
  trap 'rc=$?; if [[ $rc -ne 0 ]]; then echo false >&3; fi' EXIT
  local target=/tmp/site
  while [[ $# -gt 0 ]]; do
    case $1 in
      --target) [[ $# -ge 2 && -n $2 ]] || usage; target=$2; shift 2 ;;
      --target=*) target=${1#--target=}; [[ -n $target ]] || usage; shift ;;
      *) usage ;;
    esac
  done
  [[ $target = /* ]] || target="$CALLER_PWD/$target"

  command -v "$PYTHON" >/dev/null || die "no '$PYTHON' on PATH"
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' \
    || die "$PYTHON is $("$PYTHON" -V 2>&1), the wheels are for CPython 3.12"
  [[ -d $WHL ]] || die ".whl/ is missing at $WHL: run 'bash scripts/gpu_wheels.sh fetch' on the dev machine and carry .whl (run tool: carry [\".whl\"])"
  shopt -s nullglob
  local wheels=("$WHL"/*.whl)
  shopt -u nullglob
  [[ ${#wheels[@]} -gt 0 ]] || die ".whl/ holds no wheels: run 'bash scripts/gpu_wheels.sh fetch' on the dev machine and carry .whl"
  local miss
  miss=$(helper missing "$WHL" "${PINS[@]}")
  [[ -z $miss ]] || die "wheels missing from .whl/: $(echo $miss)"

  # A fresh target each time, but only wipe a folder this script made.
  if [[ -e $target ]]; then
    if [[ -f $target/.gpu_wheels ]]; then
      rm -rf -- "$target"
    elif [[ -n $(ls -A -- "$target") ]]; then
      die "$target exists, is not empty and was not made by this script; pick another --target"
    fi
  fi
  mkdir -p -- "$target"

  if "$PYTHON" -m pip --version >/dev/null 2>&1; then
    PIP_ROOT_USER_ACTION=ignore "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --disable-pip-version-check --upgrade --target "$target" "${wheels[@]}" \
      || { echo "gpu_wheels: pip install failed; unpacking the wheels directly" >&2
           rm -rf -- "$target" && mkdir -p -- "$target"
           helper unpack "$target" "${wheels[@]}" || die "unpacking the wheels failed"; }
  else
    echo "gpu_wheels: no pip for $PYTHON; unpacking the wheels directly" >&2
    helper unpack "$target" "${wheels[@]}" || die "unpacking the wheels failed"
  fi
  printf '%s\n' "${PINS[@]}" >"$target/.gpu_wheels"

  PYTHONPATH="$target${PYTHONPATH:+:$PYTHONPATH}" \
    helper imports "$target" "${IMPORTS[@]}" -- "${PINS[@]}" \
    || die "import check failed (see above); PYTHONPATH was $target${PYTHONPATH:+:$PYTHONPATH}"

  printf 'export PYTHONPATH=%q${PYTHONPATH:+:$PYTHONPATH}\n' "$target" >&3
}

[[ $# -ge 1 ]] || usage
mode=$1
shift
case $mode in
  fetch) [[ $# -eq 0 ]] || usage; do_fetch ;;
  check) [[ $# -eq 0 ]] || usage; do_check ;;
  install) do_install "$@" ;;
  -h|--help|help) usage ;;
  *) usage ;;
esac
