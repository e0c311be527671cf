#!/usr/bin/env bash
# get-chromium.sh [CACHE_DIR]
#
# Fetches a self-contained headless Chromium (chrome-headless-shell build shipped
# inside the npm package @sparticuz/chromium) from the npm registry only, unpacks
# it into CACHE_DIR (default ~/.cache/compressor-chromium) and prints the absolute
# path of a launcher script:
#
#   LAUNCHER --dump-dom file:///x.html          # prints the serialized DOM
#   LAUNCHER --screenshot=/tmp/x.png URL        # also --print-to-pdf[=file]
#   playwright: chromium.launch(executable_path=LAUNCHER)
#
# Needs: bash, python3 (+ pip, only if the `brotli` module is missing), network
# access to registry.npmjs.org (and PyPI for brotli). Idempotent: a complete
# install is detected and reused. On failure prints one line "get-chromium: ..."
# on stderr and exits non-zero.
#
# Environment overrides:
#   CHROMIUM_NPM_VERSION   @sparticuz/chromium version (default 153.0.0)
#   NPM_REGISTRY           registry base URL (default https://registry.npmjs.org)
set -euo pipefail

VERSION="${CHROMIUM_NPM_VERSION:-153.0.0}"
REGISTRY="${NPM_REGISTRY:-https://registry.npmjs.org}"
CACHE="${1:-${HOME:-/tmp}/.cache/compressor-chromium}"

die() { echo "get-chromium: $*" >&2; exit 1; }

[ "$(uname -s 2>/dev/null)" = Linux ] || die "only Linux is supported"
case "$(uname -m)" in x86_64|amd64) ;; *) die "only x86_64 is supported (got $(uname -m))";; esac
PY="$(command -v python3 || true)"
[ -n "$PY" ] || die "python3 not found on PATH"

mkdir -p "$CACHE" 2>/dev/null || die "cannot create cache dir $CACHE"
CACHE="$(cd "$CACHE" && pwd -P)"
DEST="$CACHE/sparticuz-chromium-$VERSION"
LAUNCHER="$DEST/chromium-launcher"

if [ -f "$DEST/.complete" ] && [ -x "$LAUNCHER" ] && [ -x "$DEST/chromium" ]; then
  echo "$LAUNCHER"
  exit 0
fi

# Serialize concurrent installs into the same cache.
if command -v flock >/dev/null 2>&1; then
  exec 9>"$CACHE/.install-$VERSION.lock"
  flock 9
  if [ -f "$DEST/.complete" ] && [ -x "$LAUNCHER" ]; then echo "$LAUNCHER"; exit 0; fi
  rm -rf "$CACHE/.stage-$VERSION".* 2>/dev/null || true   # leftovers of killed runs
fi

# --- brotli decoder (python module) ------------------------------------------
PYDEPS="$CACHE/.pydeps"
if ! "$PY" -c 'import brotli' >/dev/null 2>&1 &&
   ! PYTHONPATH="$PYDEPS${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c 'import brotli' >/dev/null 2>&1; then
  "$PY" -m pip install --quiet --disable-pip-version-check --no-input \
      --target "$PYDEPS" brotli >"$CACHE/.pip.log" 2>&1 ||
    die "could not pip-install the 'brotli' module (see $CACHE/.pip.log)"
fi
export PYTHONPATH="$PYDEPS${PYTHONPATH:+:$PYTHONPATH}"

STAGE="$(mktemp -d "$CACHE/.stage-$VERSION.XXXXXX")"
trap 'rm -rf "$STAGE"' EXIT

# --- download, verify, unpack -------------------------------------------------
"$PY" - "$REGISTRY" "$VERSION" "$STAGE" >"$CACHE/.install.log" 2>&1 <<'PYEOF' ||
import base64, hashlib, io, json, os, sys, tarfile, time, urllib.error, urllib.request
import brotli

registry, version, stage = sys.argv[1].rstrip("/"), sys.argv[2], sys.argv[3]
t0 = time.time()

def fetch(url, timeout=120):
    req = urllib.request.Request(url, headers={"User-Agent": "get-chromium.sh"})
    for attempt in range(3):
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.read()
        except Exception as e:  # noqa: BLE001
            err = e
            if isinstance(e, urllib.error.HTTPError) and 400 <= e.code < 500:
                break
            time.sleep(2 * (attempt + 1))
    raise SystemExit("download failed: %s: %s" % (url, err))

meta = json.loads(fetch("%s/@sparticuz%%2fchromium/%s" % (registry, version)))
dist = meta["dist"]
tgz = fetch(dist["tarball"], timeout=600)
print("downloaded %s (%.1f MB) in %.1fs" % (dist["tarball"], len(tgz) / 1e6, time.time() - t0))
integ = dist.get("integrity", "")
if integ.startswith("sha512-"):
    if base64.b64encode(hashlib.sha512(tgz).digest()).decode() != integ[7:]:
        raise SystemExit("sha512 integrity mismatch for " + dist["tarball"])
elif dist.get("shasum"):
    if hashlib.sha1(tgz).hexdigest() != dist["shasum"]:
        raise SystemExit("sha1 mismatch for " + dist["tarball"])

def unbrotli_stream(src, dst):
    d = brotli.Decompressor()
    while True:
        chunk = src.read(1 << 20)
        if not chunk:
            break
        dst.write(d.process(chunk))
    if hasattr(d, "is_finished") and not d.is_finished():
        raise SystemExit("truncated brotli stream")

def safe_extract(tar_bytes, dest):
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tf:
        for m in tf.getmembers():
            p = os.path.normpath(m.name)
            if p.startswith("..") or os.path.isabs(p) or not (m.isfile() or m.isdir()):
                continue
            out = os.path.join(dest, p)
            if m.isdir():
                os.makedirs(out, exist_ok=True)
                continue
            os.makedirs(os.path.dirname(out), exist_ok=True)
            with tf.extractfile(m) as s, open(out, "wb") as o:
                o.write(s.read())
            os.chmod(out, 0o755 if m.mode & 0o111 else 0o644)

with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as outer:
    names = outer.getnames()
    def member(n):
        if n not in names:
            raise SystemExit("package lacks " + n + " (only x64 packages with bin/*.br are supported)")
        return outer.extractfile(n)
    with member("package/bin/chromium.br") as s, open(os.path.join(stage, "chromium"), "wb") as o:
        unbrotli_stream(s, o)
    os.chmod(os.path.join(stage, "chromium"), 0o755)
    for name in ("swiftshader", "fonts", "al2023"):
        n = "package/bin/%s.tar.br" % name
        if n not in names:
            if name == "al2023":
                continue
            member(n)
        buf = io.BytesIO()
        with outer.extractfile(n) as s:
            unbrotli_stream(s, buf)
        # Same layout as the package's own lambdafs.inflate(): swiftshader's files
        # must sit next to the chromium binary (ANGLE's libEGL/libGLESv2 and the
        # Vulkan ICD json are looked up relative to the executable's directory);
        # fonts.tar -> fonts/, al2023.tar -> al2023/lib.
        safe_extract(buf.getvalue(), stage if name == "swiftshader" else os.path.join(stage, name))
print("unpacked in %.1fs total" % (time.time() - t0))
PYEOF
  die "download/unpack failed: $(tail -n 1 "$CACHE/.install.log" 2>/dev/null)"

[ -x "$STAGE/chromium" ] && [ -f "$STAGE/libGLESv2.so" ] && [ -f "$STAGE/vk_swiftshader_icd.json" ] ||
  die "unexpected package layout (no chromium/libGLESv2.so/vk_swiftshader_icd.json)"

# --- fontconfig: bundled Open Sans + whatever the system has --------------------
mkdir -p "$STAGE/fonts"
cat >"$STAGE/fonts/fonts.conf" <<EOF
<?xml version="1.0"?>
<!DOCTYPE fontconfig SYSTEM "fonts.dtd">
<fontconfig>
  <dir>$DEST/fonts/fonts</dir>
  <dir>/usr/share/fonts</dir>
  <dir>/usr/local/share/fonts</dir>
  <cachedir>$DEST/fonts/cache</cachedir>
  <include ignore_missing="yes">/etc/fonts/conf.d</include>
</fontconfig>
EOF
mkdir -p "$STAGE/fonts/cache" "$STAGE/home"

# The bundled NSS/NSPR/expat (built for Amazon Linux 2023, glibc >= 2.34) are only
# put on LD_LIBRARY_PATH when chromium cannot start with the system's libraries.
USE_BUNDLED_LIBS=0
if ! timeout 60 "$STAGE/chromium" --version >/dev/null 2>&1; then
  if LD_LIBRARY_PATH="$STAGE/al2023/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
     timeout 60 "$STAGE/chromium" --version >/dev/null 2>&1; then
    USE_BUNDLED_LIBS=1
  else
    die "chromium binary does not start here: $("$STAGE/chromium" --version 2>&1 | head -n 1)"
  fi
fi

# --- headless-command emulation (--dump-dom / --screenshot / --print-to-pdf) ---
# This build has headless_enable_commands=false, so chromium itself ignores those
# switches and never exits; the helper below drives it over --remote-debugging-pipe.
cat >"$STAGE/headless_cmd.py" <<'PYEOF'
#!/usr/bin/env python3
"""Emulates chrome-headless-shell's one-shot commands (--dump-dom,
--screenshot[=file], --print-to-pdf[=file], --timeout=ms) over the DevTools
protocol on --remote-debugging-pipe. Needed because the @sparticuz/chromium
build is compiled with headless_enable_commands=false: it silently ignores
these switches and keeps running forever.

usage: headless_cmd.py CHROMIUM_BINARY [chromium flags...] [command flags...] URL
Standard library only.
"""
import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time


def main(argv):
    if len(argv) < 2:
        print("headless_cmd.py: missing chromium binary", file=sys.stderr)
        return 2
    binary = argv[1]
    dump_dom = False
    screenshot = None
    pdf = None
    timeout_ms = 30000
    window = None
    url = None
    passthru = []
    user_data_dir = None
    for a in argv[2:]:
        if a == "--dump-dom":
            dump_dom = True
        elif a == "--screenshot" or a.startswith("--screenshot="):
            screenshot = a.split("=", 1)[1] if "=" in a else "screenshot.png"
        elif a == "--print-to-pdf" or a.startswith("--print-to-pdf="):
            pdf = a.split("=", 1)[1] if "=" in a else "output.pdf"
        elif a.startswith("--timeout="):
            timeout_ms = int(a.split("=", 1)[1])
        elif a.startswith("--virtual-time-budget="):
            pass  # not emulated; the load event is awaited instead
        elif a.startswith("--remote-debugging-"):
            pass  # we own the debugging channel
        elif a.startswith("--"):
            if a.startswith("--window-size="):
                w, h = a.split("=", 1)[1].replace("x", ",").split(",")
                window = (int(w), int(h))
            if a.startswith("--user-data-dir="):
                user_data_dir = a.split("=", 1)[1]
            passthru.append(a)
        else:
            url = a
    if url is None:
        url = "about:blank"
    elif "://" not in url and not url.startswith(("about:", "data:")):
        url = "file://" + os.path.abspath(url)

    tmp_profile = None
    if user_data_dir is None:
        tmp_profile = tempfile.mkdtemp(prefix="chromium-cmd-")
        passthru.append("--user-data-dir=" + tmp_profile)

    # pipes: we write commands to fd 3 of the child, read replies from fd 4
    cmd_r, cmd_w = os.pipe()
    rsp_r, rsp_w = os.pipe()
    # move the child ends well above 4 so the dup2 calls cannot clobber them
    hi_cmd_r = fcntl.fcntl(cmd_r, fcntl.F_DUPFD_CLOEXEC, 10)
    hi_rsp_w = fcntl.fcntl(rsp_w, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(cmd_r)
    os.close(rsp_w)

    def child_fds():
        os.dup2(hi_cmd_r, 3)
        os.dup2(hi_rsp_w, 4)

    proc = subprocess.Popen(
        [binary] + passthru + ["--remote-debugging-pipe", "about:blank"],
        preexec_fn=child_fds,
        close_fds=False,  # close_fds would run after preexec_fn and close 3/4
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )
    os.close(hi_cmd_r)
    os.close(hi_rsp_w)

    deadline = time.monotonic() + timeout_ms / 1000.0 + 15
    buf = b""
    pending = []
    next_id = [0]

    def send(method, params=None, session=None):
        next_id[0] += 1
        msg = {"id": next_id[0], "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(cmd_w, json.dumps(msg).encode() + b"\0")
        return next_id[0]

    def read_msg():
        nonlocal buf
        while b"\0" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("timed out waiting for the browser")
            r, _, _ = select.select([rsp_r], [], [], left)
            if not r:
                continue
            chunk = os.read(rsp_r, 1 << 20)
            if not chunk:
                raise RuntimeError("browser closed the DevTools pipe "
                                   "(exit code %s)" % proc.poll())
            buf += chunk
        raw, buf = buf.split(b"\0", 1)
        return json.loads(raw)

    def call(method, params=None, session=None):
        i = send(method, params, session)
        while True:
            m = read_msg()
            if m.get("id") == i:
                if "error" in m:
                    raise RuntimeError("%s failed: %s" % (method, m["error"]))
                return m.get("result", {})
            pending.append(m)

    def wait_event(name, session, until):
        while True:
            for k, m in enumerate(pending):
                if m.get("method") == name and m.get("sessionId") == session:
                    del pending[k]
                    return True
            if time.monotonic() > until:
                return False
            pending.append(read_msg())

    rc = 0
    try:
        tid = call("Target.createTarget", {"url": "about:blank"})["targetId"]
        sid = call("Target.attachToTarget",
                   {"targetId": tid, "flatten": True})["sessionId"]
        call("Page.enable", session=sid)
        if window:
            call("Emulation.setDeviceMetricsOverride",
                 {"width": window[0], "height": window[1],
                  "deviceScaleFactor": 1, "mobile": False}, session=sid)
        del pending[:]
        nav = call("Page.navigate", {"url": url}, session=sid)
        if nav.get("errorText"):
            raise RuntimeError("navigation to %s failed: %s"
                               % (url, nav["errorText"]))
        load_deadline = time.monotonic() + timeout_ms / 1000.0
        if not wait_event("Page.loadEventFired", sid, load_deadline):
            print("Page load timed out.", file=sys.stderr)
            rc = 1
        if dump_dom:
            r = call("Runtime.evaluate",
                     {"expression": "document.documentElement ? "
                      "document.documentElement.outerHTML : ''",
                      "returnByValue": True}, session=sid)
            sys.stdout.write(r["result"].get("value", "") + "\n")
            sys.stdout.flush()
        if screenshot:
            r = call("Page.captureScreenshot",
                     {"format": "jpeg" if screenshot.lower().endswith(
                         (".jpg", ".jpeg")) else "png"}, session=sid)
            data = base64.b64decode(r["data"])
            with open(screenshot, "wb") as f:
                f.write(data)
            print("%d bytes written to file %s" % (len(data), screenshot),
                  file=sys.stderr)
        if pdf:
            r = call("Page.printToPDF", {}, session=sid)
            data = base64.b64decode(r["data"])
            with open(pdf, "wb") as f:
                f.write(data)
            print("%d bytes written to file %s" % (len(data), pdf),
                  file=sys.stderr)
        try:
            send("Browser.close")
        except OSError:
            pass
    except Exception as e:  # noqa: BLE001
        print("headless_cmd: %s" % e, file=sys.stderr)
        rc = 1
        if proc.poll() is None:
            proc.terminate()
    finally:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        os.close(cmd_w)
        os.close(rsp_r)
        if tmp_profile:
            shutil.rmtree(tmp_profile, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv))
PYEOF

# --- launcher -------------------------------------------------------------------
cat >"$STAGE/chromium-launcher" <<EOF
#!/bin/bash
# Launcher for @sparticuz/chromium $VERSION (generated by get-chromium.sh).
# Works with no PATH/HOME in the environment (e.g. playwright's env={...}).
HERE="\$(cd -P -- "\$(dirname -- "\${BASH_SOURCE[0]}")" 2>/dev/null && pwd -P)" ||
  HERE="$DEST"
[ -x "\$HERE/chromium" ] || HERE="$DEST"

# fontconfig is statically linked into chromium; point it at our config.
export FONTCONFIG_PATH="\$HERE/fonts"
export FONTCONFIG_FILE="\$HERE/fonts/fonts.conf"
# chromium writes ~/.pki etc.; use a private home if HOME is unset/unwritable.
if [ -z "\${HOME:-}" ] || [ ! -w "\${HOME}" ]; then export HOME="\$HERE/home"; fi
if [ "$USE_BUNDLED_LIBS" = 1 ]; then
  export LD_LIBRARY_PATH="\$HERE/al2023/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
fi

# Flags: no sandbox (no setuid helper, often root), no zygote, software-only
# rendering. GL/Vulkan (SwiftShader) libs still have to sit next to the binary:
# chromium probes them even with --disable-gpu and dies with SIGTRAP otherwise.
FLAGS=(
  --headless
  --no-sandbox
  --disable-setuid-sandbox
  --no-zygote
  --disable-gpu
  --disable-dev-shm-usage
  --no-first-run
  --no-default-browser-check
  --disable-domain-reliability
  --no-pings
  --font-render-hinting=none
  --disable-features=AudioServiceOutOfProcess
)
if [ -n "\${CHROMIUM_LAUNCHER_EXTRA_FLAGS:-}" ]; then
  read -r -a _extra <<<"\$CHROMIUM_LAUNCHER_EXTRA_FLAGS"; FLAGS+=("\${_extra[@]}")
fi

for a in "\$@"; do
  case "\$a" in
    --remote-debugging-pipe*|--remote-debugging-port*) break ;;
    --dump-dom|--screenshot|--screenshot=*|--print-to-pdf|--print-to-pdf=*)
      PY="\$(command -v python3 2>/dev/null)" || PY="$PY"
      [ -x "\$PY" ] || PY="$PY"
      exec "\$PY" "\$HERE/headless_cmd.py" "\$HERE/chromium" "\${FLAGS[@]}" "\$@" ;;
  esac
done
exec "\$HERE/chromium" "\${FLAGS[@]}" "\$@"
EOF
chmod 755 "$STAGE/chromium-launcher" "$STAGE/headless_cmd.py"

# --- smoke test in the staging dir (before publishing it) ----------------------
SMOKE_DIR="$(mktemp -d)"
printf '<html><body><svg width="10" height="10"></svg><p id="ok">smoke-ok</p></body></html>' >"$SMOKE_DIR/t.html"
SMOKE_OUT="$(cd "$SMOKE_DIR" && timeout 120 "$STAGE/chromium-launcher" --dump-dom "file://$SMOKE_DIR/t.html" 2>"$SMOKE_DIR/err")" || true
if ! grep -q 'smoke-ok' <<<"$SMOKE_OUT"; then
  cp "$SMOKE_DIR/err" "$CACHE/.smoke.err" 2>/dev/null || true
  rm -rf "$SMOKE_DIR"
  die "smoke test failed: chromium could not dump a local page (stderr in $CACHE/.smoke.err)"
fi
rm -rf "$SMOKE_DIR"

# --- publish atomically -----------------------------------------------------------
rm -rf "$DEST.old"
[ -e "$DEST" ] && mv "$DEST" "$DEST.old"
# the launcher hard-codes $DEST only as a fallback; it locates itself at runtime
chmod 755 "$STAGE"
mv "$STAGE" "$DEST"
trap - EXIT
rm -rf "$DEST.old"
touch "$DEST/.complete"
echo "$LAUNCHER"
