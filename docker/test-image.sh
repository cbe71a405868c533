#!/usr/bin/env bash
# Build docker/Dockerfile.cpu for real and check the container answers like qwt-run; then its OpenVINO
# variant docker/Dockerfile.openvino, whose answer must equal the host's OpenVINO and give the first image's top-1.
#
#   docker/test-image.sh            (as root; called by .ci/run after the test suite)
#
# No container registry is reachable here, so nothing is pulled: Docker Engine comes from apt
# (docker.io), the base image is Debian bookworm + python3 made by debootstrap and `docker
# import`ed, and the image is built with --network none from a wheelhouse prepared on the host
# by `pip download` (the same onnxruntime/numpy/Pillow versions as the host, so the outputs
# can be compared exactly). Our own dockerd runs without a bridge or iptables rules, on its own
# socket and data root, and is stopped by its PID at the end, whatever happens.
#
# Prints SKIPPED and the reason, and exits 0, where root, apt or Docker are not available;
# exits non-zero when it runs and any check fails.
#
# Environment: QWT_TEST_MODEL=path.onnx to use an existing INT8 model (else EfficientNet-Lite0
# is exported once and cached); QWT_SKIP_DOCKER=1 to skip; QWT_DOCKER_CACHE (default build/docker-cache).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
T_START=$(date +%s.%N)
CACHE=${QWT_DOCKER_CACHE:-$REPO/build/docker-cache}
IMG=qwt-serve:cpu-test
BASE=qwt-base:bookworm-python3
CNAME=qwt-serve-test-$$
SOCK=/run/qwt-docker.sock
DATA=/var/lib/qwt-docker
EXEC=/run/qwt-docker
DOCKERD_PID=""

log() { printf '[test-image %5.1fs] %s\n' "$(echo "$(date +%s.%N) - $T_START" | bc)" "$*"; }
skip() { echo "test-image: SKIPPED: $*"; exit 0; }
die() { echo "test-image: FAILED: $*" >&2; exit 1; }

[[ ${QWT_SKIP_DOCKER:-0} == 1 ]] && skip "QWT_SKIP_DOCKER=1"
[[ $(uname -s) == Linux ]] || skip "needs Linux (this is $(uname -s))"
[[ $(id -u) == 0 ]] || skip "needs root to install docker.io/debootstrap and start dockerd (running as uid $(id -u))"
command -v python3 >/dev/null || skip "no python3"
python3 -c "import onnxruntime, numpy, PIL, qwt_deploy" 2>/dev/null \
    || skip "the host python3 lacks the project (activate the venv where qwt-deploy is installed)"
command -v bc >/dev/null || log() { echo "[test-image] $*"; }

# ---- 1. Docker Engine and debootstrap from apt (not preinstalled here) ------------------------
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if ((${#missing[@]})); then
    command -v apt-get >/dev/null || skip "needs ${missing[*]} and there is no apt-get to install them"
    log "apt-get install ${missing[*]}"
    if ! (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}") >/tmp/qwt-apt.log 2>&1; then
        tail -5 /tmp/qwt-apt.log
        skip "apt-get install ${missing[*]} failed (no package mirror reachable?)"
    fi
fi
command -v docker >/dev/null || skip "no docker client after installing docker.io"

cleanup() {
    local rc=$?
    set +e
    if [[ -n $DOCKERD_PID ]] && kill -0 "$DOCKERD_PID" 2>/dev/null; then
        docker rm -f "$CNAME" "$CNAME-ov" "$CNAME-ort" >/dev/null 2>&1
        docker rmi -f "$IMG" "$IMG-baked" "$IMG-openvino" "$BASE" >/dev/null 2>&1
        docker image prune -f >/dev/null 2>&1
        kill "$DOCKERD_PID"
        for _ in $(seq 1 40); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
        kill -0 "$DOCKERD_PID" 2>/dev/null && kill -9 "$DOCKERD_PID"
        wait "$DOCKERD_PID" 2>/dev/null
        echo "[test-image] dockerd (PID $DOCKERD_PID) stopped; images and containers removed"
    fi
    # dockerd leaves its network namespace (and, if killed, overlay mounts) mounted: unmount, then delete
    awk -v a="$EXEC" -v b="$DATA" 'index($2, a) == 1 || index($2, b) == 1 {print $2}' /proc/mounts | sort -r |
        while read -r m; do umount -l "$m"; done
    rm -rf "$DATA" "$EXEC" "$CACHE/ctx" "$CACHE/ctx-openvino" "$CACHE/mount"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- 2. our own dockerd: no bridge, no iptables, own socket and data root ---------------------
mkdir -p "$CACHE" "$DATA" "$EXEC"
log "starting dockerd --bridge=none --iptables=false"
dockerd --bridge=none --iptables=false --host "unix://$SOCK" --data-root "$DATA" --exec-root "$EXEC" \
    --pidfile "$EXEC/dockerd.pid" >"$CACHE/dockerd.log" 2>&1 &
DOCKERD_PID=$!
export DOCKER_HOST=unix://$SOCK DOCKER_BUILDKIT=0
for _ in $(seq 1 60); do docker version >/dev/null 2>&1 && break; kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
if ! docker version >/dev/null 2>&1; then
    tail -5 "$CACHE/dockerd.log"
    skip "dockerd did not start here (see $CACHE/dockerd.log)"
fi
log "dockerd PID $DOCKERD_PID up (server $(docker version -f '{{.Server.Version}}'))"

# ---- 3. inputs: base rootfs, wheelhouse, project wheel, model (cached under $CACHE) -----------
docker/make-base-image.sh "$CACHE/bookworm-python3.tar"
docker import "$CACHE/bookworm-python3.tar" "$BASE" >/dev/null
log "base image $BASE imported"

pins=$(python3 -c "from importlib.metadata import version as v; print(' '.join(f'{p}=={v(p)}' for p in ('onnxruntime', 'numpy', 'pillow')))")
key=$(echo "$pins $(python3 -c 'import sys; print(sys.version_info[:2], sys.platform)') $(uname -m)" | sha256sum | cut -c1-12)
WHEELS=$CACHE/wheelhouse-$key
if [[ ! -f $WHEELS/.complete ]]; then
    log "pip download $pins"
    rm -rf "$WHEELS" && mkdir -p "$WHEELS"
    python3 -m pip download -q --disable-pip-version-check --only-binary=:all: -d "$WHEELS" $pins
    touch "$WHEELS/.complete"
fi
rm -rf "$CACHE/ctx" && mkdir -p "$CACHE/ctx"
cp "$WHEELS"/*.whl "$CACHE/ctx/"
python3 -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation -w "$CACHE/ctx" . >/dev/null
cp docker/Dockerfile.cpu "$CACHE/ctx/Dockerfile"
log "build context: $(ls "$CACHE/ctx" | grep -c whl) wheels ($pins + the project)"

MODEL=${QWT_TEST_MODEL:-}
if [[ -z $MODEL ]]; then
    src=$(find qwt_deploy calibration graph_passes -name '*.py' -o -name '*.txt' | sort | xargs cat | sha256sum | cut -c1-12)
    MODEL=$CACHE/lite0-$src.int8.onnx
    if [[ ! -f $MODEL ]]; then
        log "exporting EfficientNet-Lite0 INT8 (qwt-export --example efficientnet-lite0 --num-calib 64)"
        rm -f "$CACHE"/lite0-*.onnx "$CACHE"/lite0-*.json
        qwt-export --example efficientnet-lite0 --num-calib 64 --no-latency --quiet -o "$MODEL" >/dev/null
    fi
fi
[[ -f $MODEL ]] || die "model $MODEL does not exist"
# The container runs as uid 10001: mount a world-readable copy (qwt-export writes 0600 files).
mkdir -p "$CACHE/mount" && install -m 0644 "$MODEL" "$CACHE/mount/model.onnx"
MODEL=$CACHE/mount/model.onnx
cp "$MODEL" "$CACHE/ctx/model.onnx"  # in the context of both builds; only the baked one copies it in

# ---- 4. build offline ------------------------------------------------------------------------
t=$(date +%s.%N)
docker build -q --network none --build-arg BASE_IMAGE="$BASE" -t "$IMG" "$CACHE/ctx" >/dev/null \
    || { docker build --network none --build-arg BASE_IMAGE="$BASE" -t "$IMG" "$CACHE/ctx" 2>&1 | tail -30; die "docker build"; }
BUILD_S=$(python3 -c "import time; print(round(time.time() - $t, 1))")
SIZE_MB=$(python3 -c "print(round($(docker image inspect -f '{{.Size}}' "$IMG") / 1e6, 1))")
BASE_MB=$(python3 -c "print(round($(docker image inspect -f '{{.Size}}' "$BASE") / 1e6, 1))")
log "built $IMG in $BUILD_S s: $SIZE_MB MB (base $BASE_MB MB)"
t=$(date +%s.%N)
docker build -q --network none --build-arg BASE_IMAGE="$BASE" --build-arg MODEL=model.onnx -t "$IMG-baked" \
    "$CACHE/ctx" >/dev/null || die "docker build --build-arg MODEL=model.onnx"
BAKED_S=$(python3 -c "import time; print(round(time.time() - $t, 1))")

# ---- 5. no torch inside; non-root; qwt-run inside agrees with qwt-run outside ------------------
docker run --rm --network none --entrypoint python3 "$IMG" -c "
import importlib.util as u, sys
bad = [m for m in ('torch', 'torchvision', 'onnx', 'tensorflow') if u.find_spec(m)]
print('workstation packages inside:', bad or 'none'); sys.exit(1 if bad else 0)" || die "the image contains ${bad:-torch}"
[[ $(docker image inspect -f '{{.Config.User}}' "$IMG") == 10001 ]] || die "the image does not run as uid 10001"
PHOTO=$(python3 -c "
import glob, importlib.util, os
for mod, pat in (('foolbox', 'data/imagenet_0[0-2]_*.jpg'), ('skimage', 'data/chelsea.png')):
    s = importlib.util.find_spec(mod)
    if s:
        print(sorted(glob.glob(os.path.join(os.path.dirname(s.origin), pat)))[0]); break")
[[ -f $PHOTO ]] || die "no test photo (install the demo extra: foolbox, scikit-image)"
inside=$(docker run --rm --network none -v "$MODEL:/models/model.onnx:ro" -v "$PHOTO:/tmp/photo:ro" \
    --entrypoint qwt-run "$IMG" /models/model.onnx --input /tmp/photo --json --top-k 5) || die "qwt-run inside the image"
baked=$(docker run --rm --network none -v "$PHOTO:/tmp/photo:ro" --entrypoint qwt-run "$IMG-baked" \
    /models/model.onnx --input /tmp/photo --json --top-k 5) || die "qwt-run in the image with the model baked in"
outside=$(qwt-run "$MODEL" --input "$PHOTO" --json --top-k 5)
python3 - "$inside" "$outside" "$baked" <<'PY' || die "qwt-run inside the image disagrees with qwt-run on the host"
import json, sys
a, b, c = (json.loads(s)["top_k"][0] for s in sys.argv[1:4])
for got in (a, c):
    assert [t["index"] for t in got] == [t["index"] for t in b], (got, b)
    assert max(abs(x["score"] - y["score"]) for x, y in zip(got, b)) <= 1e-5, (got, b)
print(f"qwt-run in the image (model mounted, and baked in) == on the host: top-5 {[t['label'] for t in a]}")
PY

# ---- 6. serve: --network host, bound to 127.0.0.1, model mounted read-only ---------------------
PORT=$(python3 -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
T0=$(python3 -c "import time; print(time.time())")
docker run -d --name "$CNAME" --network host --read-only --tmpfs /tmp -e QWT_HOST=127.0.0.1 -e QWT_PORT="$PORT" \
    -v "$MODEL:/models/model.onnx:ro" --health-interval 1s --health-start-period 30s "$IMG" /models/model.onnx \
    --threads 2 >/dev/null
python3 - "$MODEL" "$PHOTO" "$PORT" "$T0" "$CACHE/check.json" <<'PY' || { docker logs "$CNAME" 2>&1 | tail -20; die "serving checks"; }
import http.client, json, subprocess, sys, tempfile, time
import numpy as np
model, photo, port, t0, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
body = open(photo, "rb").read()

def post(data, ctype, path="/v1/predict"):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("POST", path, body=data, headers={"Content-Type": ctype})
    r = c.getresponse()
    return r.status, json.loads(r.read())

while True:  # container start -> first answer
    try:
        status, res = post(body, "image/jpeg", "/v1/predict?outputs=1")  # raw outputs: compared with qwt-run
        break
    except OSError:
        if time.time() - t0 > 60:
            sys.exit("no answer within 60 s")
        time.sleep(0.05)
first = time.time() - t0
assert status == 200, res
with tempfile.NamedTemporaryFile(suffix=".npy") as f:
    subprocess.run(["qwt-run", model, "--input", photo, "--output", f.name], check=True, capture_output=True)
    ref = np.load(f.name)
got = np.asarray(res["outputs"][0]["data"], np.float32)
diff = float(np.abs(got - ref).max())
assert got.shape == ref.shape and diff <= 1e-5 * max(1.0, float(np.abs(ref).max())), diff
assert res["top_k"][0][0]["index"] == int(ref[0].argmax())
print(f"/v1/predict == qwt-run (max |diff| {diff:g}), top-1 {res['top_k'][0][0].get('label')}")
bad = {"undecodable image": ((b"\xff\xd8\xff\xe0garbage" * 20, "image/jpeg"), 400, "undecodable_image"),
       "wrong shape": ((json.dumps({"shape": [1, 3, 10, 10], "data": [0.0] * 300}), "application/json"), 422, "wrong_shape"),
       "bad JSON": ((b"{not json", "application/json"), 400, "bad_json")}
for name, ((data, ctype), want, code) in bad.items():
    status, res = post(data, ctype)
    assert (status, res["error"]["code"]) == (want, code), (name, status, res)
    print(f"{name}: {status} {code}")
assert post(body, "image/jpeg")[0] == 200  # still serving
json.dump({"start_to_first_answer_s": round(first, 2), "max_abs_diff_vs_qwt_run": diff}, open(out, "w"))
PY
FIRST_S=$(python3 -c "import json; print(json.load(open('$CACHE/check.json'))['start_to_first_answer_s'])")
for _ in $(seq 1 60); do
    h=$(docker inspect -f '{{.State.Health.Status}}' "$CNAME"); [[ $h == healthy ]] && break; sleep 0.5
done
[[ $h == healthy ]] || die "HEALTHCHECK status is '$h', not healthy"
[[ $(docker exec "$CNAME" python3 -c "import os; print(os.getuid())") == 10001 ]] || die "the server does not run as uid 10001"
t=$(date +%s.%N)
docker stop -t 10 "$CNAME" >/dev/null
STOP_S=$(python3 -c "print(round($(date +%s.%N) - $t, 2))")
[[ $(docker inspect -f '{{.State.ExitCode}}' "$CNAME") == 0 ]] || die "qwt-serve did not exit 0 on SIGTERM"
log "HEALTHCHECK healthy; runs as uid 10001; docker stop (SIGTERM) -> exit 0 in $STOP_S s"

# ---- 7. the OpenVINO variant (docker/Dockerfile.openvino, issue #14): same model, same photo ---
# Built offline like the first image, from the host's openvino/numpy/Pillow versions. Its
# /v1/predict must equal the host's `qwt-run --runtime openvino` (same runtime and version: within
# float noise) and give the ONNX Runtime image's top-1. Against the ONNX Runtime image the logits
# are reported in output steps and held to MAX_STEPS_VS_ORT, not 1: the two runtimes requantize in
# their own float order and the rounding flips compound with depth (Lite0, 128 held-out crops:
# up to 6-7 steps apart, 88% of logits within 1 step; bench/results/openvino.md). Skipped, and
# said so, where the host has no openvino to pin.
OV_FIGURES=None
ov_pins=$(python3 -c "from importlib.metadata import version as v; print(' '.join(f'{p}=={v(p)}' for p in ('openvino', 'numpy', 'pillow')))" 2>/dev/null) || ov_pins=""
if [[ -z $ov_pins ]]; then
    log "OpenVINO image SKIPPED: the host python has no openvino to pin (pip install openvino)"
else
    key=$(echo "$ov_pins $(python3 -c 'import sys; print(sys.version_info[:2], sys.platform)') $(uname -m)" | sha256sum | cut -c1-12)
    WHEELS_OV=$CACHE/wheelhouse-openvino-$key
    if [[ ! -f $WHEELS_OV/.complete ]]; then
        log "pip download $ov_pins"
        rm -rf "$WHEELS_OV" && mkdir -p "$WHEELS_OV"
        python3 -m pip download -q --disable-pip-version-check --only-binary=:all: -d "$WHEELS_OV" $ov_pins
        touch "$WHEELS_OV/.complete"
    fi
    CTX_OV=$CACHE/ctx-openvino
    rm -rf "$CTX_OV" && mkdir -p "$CTX_OV"
    cp "$WHEELS_OV"/*.whl "$CACHE"/ctx/qwt_deploy-*.whl "$CTX_OV/"
    cp docker/Dockerfile.openvino "$CTX_OV/Dockerfile"
    t=$(date +%s.%N)
    docker build -q --network none --build-arg BASE_IMAGE="$BASE" -t "$IMG-openvino" "$CTX_OV" >/dev/null \
        || { docker build --network none --build-arg BASE_IMAGE="$BASE" -t "$IMG-openvino" "$CTX_OV" 2>&1 | tail -30; die "docker build (OpenVINO)"; }
    BUILD_OV_S=$(python3 -c "import time; print(round(time.time() - $t, 1))")
    SIZE_OV_MB=$(python3 -c "print(round($(docker image inspect -f '{{.Size}}' "$IMG-openvino") / 1e6, 1))")
    log "built $IMG-openvino in $BUILD_OV_S s: $SIZE_OV_MB MB (ONNX Runtime image $SIZE_MB MB)"
    docker run --rm --network none --entrypoint python3 "$IMG-openvino" -c "
import importlib.util as u, sys
bad = [m for m in ('torch', 'onnx', 'onnxruntime') if u.find_spec(m)]
print('inside the OpenVINO image:', bad or 'no torch, onnx or onnxruntime'); sys.exit(1 if bad else 0)" \
        || die "the OpenVINO image contains packages it must not"
    ov_run=$(docker run --rm --network none -v "$MODEL:/models/model.onnx:ro" -v "$PHOTO:/tmp/photo:ro" \
        --entrypoint qwt-run "$IMG-openvino" /models/model.onnx --input /tmp/photo --json --top-k 5 --runtime openvino) \
        || die "qwt-run --runtime openvino inside the OpenVINO image"
    PORT_ORT=$(python3 -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
    PORT_OV=$(python3 -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
    docker run -d --name "$CNAME-ort" --network host --read-only --tmpfs /tmp -e QWT_HOST=127.0.0.1 -e QWT_PORT="$PORT_ORT" \
        -v "$MODEL:/models/model.onnx:ro" "$IMG" /models/model.onnx --threads 2 >/dev/null
    T0=$(python3 -c "import time; print(time.time())")
    docker run -d --name "$CNAME-ov" --network host --read-only --tmpfs /tmp -e QWT_HOST=127.0.0.1 -e QWT_PORT="$PORT_OV" \
        -v "$MODEL:/models/model.onnx:ro" --health-interval 1s --health-start-period 30s "$IMG-openvino" \
        /models/model.onnx --threads 2 >/dev/null
    python3 - "$PHOTO" "$PORT_ORT" "$PORT_OV" "$T0" "$CACHE/check-openvino.json" "$MODEL" <<'PY' || { docker logs "$CNAME-ov" 2>&1 | tail -20; die "OpenVINO serving checks"; }
import http.client, json, subprocess, sys, tempfile, time
import numpy as np
from qwt_deploy.comparison.agreement import output_step
photo, port_ort, port_ov, t0, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
model = sys.argv[6]
MAX_STEPS_VS_ORT = 8.0
body = open(photo, "rb").read()

def post(port, path="/v1/predict?outputs=1"):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("POST", path, body=body, headers={"Content-Type": "image/jpeg"})
    r = c.getresponse()
    return r.status, json.loads(r.read())

def first_answer(port):
    while True:
        try:
            return post(port)
        except OSError:
            if time.time() - t0 > 60:
                sys.exit(f"no answer on port {port} within 60 s")
            time.sleep(0.05)

status, ov = first_answer(port_ov)
first = time.time() - t0
assert status == 200, ov
status, ort = first_answer(port_ort)
assert status == 200, ort
c = http.client.HTTPConnection("127.0.0.1", port_ov, timeout=10)
c.request("GET", "/healthz")
health = json.loads(c.getresponse().read())
assert health["runtime"] == "openvino", health
a, b = (np.asarray(r["outputs"][0]["data"], np.float32) for r in (ort, ov))
with tempfile.NamedTemporaryFile(suffix=".npy") as f:
    subprocess.run(["qwt-run", model, "--input", photo, "--runtime", "openvino", "--output", f.name], check=True,
                   capture_output=True)
    host = np.load(f.name)
same = float(np.abs(b - host).max())
assert b.shape == host.shape and same <= 1e-4 * max(1.0, float(np.abs(host).max())), f"OpenVINO image != host: {same}"
step = output_step(a)  # the 8-bit grid over the logits' range: what "one output step" means for a float output
steps = float(np.abs(a - b).max() / step)
assert a.shape == b.shape and steps <= MAX_STEPS_VS_ORT, f"OpenVINO image differs from the ONNX Runtime image by {steps:.2f} steps"
assert ov["top_k"][0][0]["index"] == ort["top_k"][0][0]["index"]
print(f"OpenVINO image /v1/predict == host qwt-run --runtime openvino (max |diff| {same:g}); vs the ONNX Runtime "
      f"image: {steps:.2f} output steps max (step {step:.4f}), same top-1 {ov['top_k'][0][0].get('label')}; "
      f"start -> first answer {first:.2f} s")
json.dump({"start_to_first_answer_s": round(first, 2), "max_steps_vs_onnxruntime_image": round(steps, 4),
           "max_abs_diff_vs_host_openvino": same}, open(out, "w"))
PY
    for _ in $(seq 1 60); do
        h=$(docker inspect -f '{{.State.Health.Status}}' "$CNAME-ov"); [[ $h == healthy ]] && break; sleep 0.5
    done
    [[ $h == healthy ]] || die "OpenVINO image HEALTHCHECK status is '$h', not healthy"
    docker stop -t 10 "$CNAME-ov" "$CNAME-ort" >/dev/null
    [[ $(docker inspect -f '{{.State.ExitCode}}' "$CNAME-ov") == 0 ]] || die "qwt-serve (OpenVINO) did not exit 0 on SIGTERM"
    FIRST_OV_S=$(python3 -c "import json; print(json.load(open('$CACHE/check-openvino.json'))['start_to_first_answer_s'])")
    STEPS_OV=$(python3 -c "import json; print(json.load(open('$CACHE/check-openvino.json'))['max_steps_vs_onnxruntime_image'])")
    log "OpenVINO image: qwt-run top-1 $(echo "$ov_run" | python3 -c "import json, sys; print(json.load(sys.stdin)['top_k'][0][0].get('label'))"); healthy; SIGTERM -> exit 0"
    OV_FIGURES="dict(name='$IMG-openvino', size_mb=$SIZE_OV_MB, build_s=$BUILD_OV_S, packages='$ov_pins', start_to_first_answer_s=$FIRST_OV_S, max_steps_vs_onnxruntime_image=$STEPS_OV)"
fi

WALL=$(python3 -c "print(round($(date +%s.%N) - $T_START, 1))")
python3 - "$CACHE/figures.json" <<PY
import json
json.dump(dict(image=dict(name="$IMG", size_mb=$SIZE_MB, base_mb=$BASE_MB, torch_inside=False, build_s=$BUILD_S,
                          baked_model_rebuild_s=$BAKED_S,
                          packages="$pins"),
               start_to_first_answer_s=$FIRST_S, stop_s=$STOP_S, script_wall_s=$WALL, openvino_image=$OV_FIGURES),
          open("$CACHE/figures.json", "w"), indent=1)
PY
echo "test-image: OK: image $SIZE_MB MB (no torch; base $BASE_MB MB), container start -> first answer ${FIRST_S} s, build $BUILD_S s, whole script ${WALL} s"
[[ $OV_FIGURES == None ]] || echo "test-image: OK: OpenVINO image $SIZE_OV_MB MB, start -> first answer ${FIRST_OV_S} s, /v1/predict within ${STEPS_OV} steps of the ONNX Runtime image's"
