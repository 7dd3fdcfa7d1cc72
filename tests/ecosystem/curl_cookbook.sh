#!/bin/bash
# Runs the commands of README.md's curl cookbook, exactly as written there,
# against the daemon at $OPTD (a fresh one: it creates run-1, run-2 and
# run-1-copy), and checks what each prints. tests/ecosystem/test_cookbook.py
# starts the daemon, runs this, and checks that every command of the cookbook
# is here. Prints "cookbook ok" and exits 0 when all is well.
#
#   OPTD=http://127.0.0.1:8080 bash tests/ecosystem/curl_cookbook.sh
set -euo pipefail
: "${OPTD:?set OPTD to the daemon URL}"
cd "$(mktemp -d)"
scratch=$PWD
trap 'rm -rf "$scratch"' EXIT

fail() { echo "cookbook: FAIL: $*" >&2; exit 1; }
# expect WHAT OUTPUT PATTERN: OUTPUT must match the extended regex PATTERN
expect() { printf '%s' "$2" | grep -Eq -- "$3" || fail "$1: got: $2 (wanted /$3/)"; }
# py EXPR: evaluates a Python expression over the variable j (the JSON in $J)
py() { J="$J" python3 -c "import json, os, sys; j = json.loads(os.environ['J']); sys.exit(0 if ($1) else 1)" \
    || fail "$2: $J"; }

# --- Create a session
out=$(curl -s -X POST $OPTD/v1/sessions -H 'Content-Type: application/json' \
  -d '{"name":"run-1","optimizer":"adam","hyperparams":{"lr":0.01},"params":[0.5,-1.25,3.0]}')
J=$out py 'j["name"] == "run-1" and j["step"] == 0 and j["size"] == 3 and j["dtype"] == "float32" and j["hyperparams"]["lr"] == 0.01 and j["hyperparams"]["betas"] == [0.9, 0.999]' "create run-1"
out=$(curl -s -X PUT $OPTD/v1/sessions/run-2 -H 'Content-Type: application/json' \
  -d '{"optimizer":"sgd","dtype":"float64","size":3,"fill":0.5}')
J=$out py 'j["name"] == "run-2" and j["size"] == 3 and j["dtype"] == "float64"' "create run-2"

# --- Step with a JSON gradient
out=$(curl -s -X POST $OPTD/v1/sessions/run-1/step -H 'Content-Type: application/json' \
  -d '{"grad":[0.1,-0.2,0.3]}')
J=$out py 'j["step"] == 1 and [round(v, 6) for v in j["params"]] == [0.49, -1.24, 2.99]' "JSON step"

# --- Step with a binary gradient file
python3 -c 'import struct, sys; sys.stdout.buffer.write(struct.pack("<3f", 0.1, -0.2, 0.3))' > grad.f32
[ "$(stat -c %s grad.f32)" = 12 ] || fail "grad.f32 is not 12 bytes"
curl -s -X POST $OPTD/v1/sessions/run-1/step -H 'Content-Type: application/octet-stream' \
  -H 'Accept: application/octet-stream' --data-binary @grad.f32 -o params.f32 -D headers.txt
out=$(grep -i '^etag' headers.txt)
expect "ETag of the binary step" "$out" '^[Ee][Tt][Aa][Gg]: "2"'
out=$(od -A n -t f4 params.f32)
[ "$(echo $out | wc -w)" = 3 ] || fail "od printed $out"
expect "binary params" "$out" '0\.48.*-1\.23.*2\.98'
step2_params=$(od -A n -t x4 params.f32)

# --- Read the parameters into a file
rm -f params.f32
curl -s $OPTD/v1/sessions/run-1/params -H 'Accept: application/octet-stream' -o params.f32
[ "$(stat -c %s params.f32)" = 12 ] || fail "params.f32 is not 12 bytes"
[ "$(od -A n -t x4 params.f32)" = "$step2_params" ] || fail "GET params differs from the step's reply"
out=$(curl -s $OPTD/v1/sessions/run-1/params)
J=$out py 'j["step"] == 2 and len(j["params"]) == 3' "JSON params"
json_params=$out

# --- Checkpoint to a file, and restore
curl -s $OPTD/v1/sessions/run-1/state -o run-1.ckpt.json
J=$(cat run-1.ckpt.json) py 'j["step"] == 2 and j["name"] == "run-1" and len(j["state"]["exp_avg"]) == 3 and len(j["state"]["exp_avg_sq"]) == 3' "checkpoint"
out=$(curl -s -X DELETE $OPTD/v1/sessions/run-1)
[ -z "$out" ] || fail "DELETE printed $out"
[ "$(curl -s -o /dev/null -w '%{http_code}' $OPTD/v1/sessions/run-1)" = 404 ] || fail "run-1 is still there"
out=$(curl -s -X PUT $OPTD/v1/sessions/run-1/state -H 'Content-Type: application/json' \
  --data-binary @run-1.ckpt.json)
J=$out py 'j["name"] == "run-1" and j["step"] == 2' "restore"
[ "$(curl -s $OPTD/v1/sessions/run-1/params)" = "$json_params" ] || fail "restored params differ"
out=$(curl -s -X PUT $OPTD/v1/sessions/run-1-copy/state -H 'Content-Type: application/json' \
  --data-binary @run-1.ckpt.json)
J=$out py 'j["name"] == "run-1-copy" and j["step"] == 2' "restore under another name"

# --- A binary checkpoint (safetensors)
curl -s $OPTD/v1/sessions/run-1/state -H 'Accept: application/octet-stream' -o run-1.safetensors
out=$(curl -s -w ' %{http_code}\n' -X PUT $OPTD/v1/sessions/run-1-copy/state \
  -H 'Content-Type: application/octet-stream' --data-binary @run-1.safetensors)
expect "binary restore" "$out" ' 200$'
J=${out% 200} py 'j["name"] == "run-1-copy" and j["step"] == 2' "binary restore body"
out=$(python3 -c 'import json, struct; f = open("run-1.safetensors", "rb"); print(f.read(struct.unpack("<Q", f.read(8))[0]).decode())')
J=$out py 'j["__metadata__"]["optimizer"] == "adam" and j["params"]["dtype"] == "F32" and j["params"]["shape"] == [3] and set(j) == {"__metadata__", "params", "exp_avg", "exp_avg_sq"}' "safetensors header"
[ "$(curl -s $OPTD/v1/sessions/run-1-copy/params)" = "$json_params" ] || fail "binary restore params differ"

# --- A conditional step (If-Match)
step=$(curl -sI $OPTD/v1/sessions/run-1 | tr -d '\r' | sed -n 's/^[Ee][Tt][Aa][Gg]: //p')
[ "$step" = '"2"' ] || fail "ETag from HEAD is $step"
out=$(curl -s -X POST $OPTD/v1/sessions/run-1/step -H 'Content-Type: application/json' \
  -H "If-Match: $step" -d '{"grad":[0.1,-0.2,0.3]}')
J=$out py 'j["step"] == 3' "conditional step"
out=$(curl -s -w ' %{http_code}\n' -X POST $OPTD/v1/sessions/run-1/step -H 'Content-Type: application/json' \
  -H "If-Match: $step" -d '{"grad":[0.1,-0.2,0.3]}')
expect "stale If-Match" "$out" ' 412$'
J=${out% 412} py 'j["error"]["code"] == "step_mismatch" and j["error"]["step"] == 3' "412 body"
# the copy continues exactly as the original: same gradient, same step, same values
a=$(curl -s $OPTD/v1/sessions/run-1/params)
b=$(curl -s -X POST $OPTD/v1/sessions/run-1-copy/step -H 'Content-Type: application/json' -d '{"grad":[0.1,-0.2,0.3]}')
J="[$a,$b]" py 'j[0]["step"] == j[1]["step"] == 3 and j[0]["params"] == j[1]["params"]' "the restored copy diverged"

# --- An idempotent retry
key=$(cat /proc/sys/kernel/random/uuid)
first=$(curl -s --retry 5 --retry-connrefused -X POST $OPTD/v1/sessions/run-1/step \
  -H 'Content-Type: application/json' -H "Idempotency-Key: $key" -d '{"grad":[0.1,-0.2,0.3]}')
J=$first py 'j["step"] == 4' "keyed step"
out=$(curl -s -i --retry 5 --retry-connrefused -X POST $OPTD/v1/sessions/run-1/step \
  -H 'Content-Type: application/json' -H "Idempotency-Key: $key" -d '{"grad":[0.1,-0.2,0.3]}')
expect "replay header" "$out" '[Ii]dempotent-[Rr]eplayed: true'
[ "$(printf '%s' "$out" | tail -n 1)" = "$first" ] || fail "the replay differs: $out"
J=$(curl -s $OPTD/v1/sessions/run-1) py 'j["step"] == 4' "applied once"
out=$(curl -s -w ' %{http_code}' -X POST $OPTD/v1/sessions/run-1/step -H 'Content-Type: application/json' \
  -H "Idempotency-Key: $key" -d '{"grad":[9,9,9]}')
expect "same key, other gradient" "$(printf '%s' "$out" | tr -d '\n')" 'idempotency_mismatch.* 422$'

# --- Change, list, delete
out=$(curl -s -X PATCH $OPTD/v1/sessions/run-1 -H 'Content-Type: application/json' \
  -d '{"hyperparams":{"lr":0.001}}')
J=$out py 'j["hyperparams"]["lr"] == 0.001 and j["step"] == 4' "PATCH"
out=$(curl -s "$OPTD/v1/sessions?limit=2")
J=$out py '[s["name"] for s in j["sessions"]] == ["run-1", "run-1-copy"] and j["next"] == "run-1-copy"' "list page 1"
out=$(curl -s "$OPTD/v1/sessions?limit=2&after=run-1-copy")
J=$out py '[s["name"] for s in j["sessions"]] == ["run-2"] and j["next"] is None' "list page 2"
out=$(curl -s -o /dev/null -w '%{http_code}\n' -X DELETE $OPTD/v1/sessions/run-2)
[ "$out" = 204 ] || fail "DELETE printed $out"

# --- History, optimizers, health and metrics
out=$(curl -s "$OPTD/v1/sessions/run-1/history?limit=2")
J=$out py '[h["step"] for h in j["history"]] == [3, 4] and j["next"] is None and all(k in j["history"][0] for k in ("time", "lr", "grad_norm", "update_norm", "param_norm", "contributors", "loss"))' "history"
out=$(curl -s $OPTD/v1/optimizers | python3 -c 'import json, sys; print([o["name"] for o in json.load(sys.stdin)["optimizers"]])')
expect "optimizers" "$out" "^\['sgd', 'momentum', 'nag', 'adagrad', 'adadelta', 'rmsprop', 'adam', 'adamax', 'adamw', 'nadam'\]$"
out=$(curl -s $OPTD/healthz)
[ "$out" = '{"status":"ok"}' ] || fail "healthz printed $out"
out=$(curl -s $OPTD/metrics | grep '^optd_steps_total')
expect "metrics" "$out" 'optd_steps_total\{optimizer="adam"\} [0-9]+'

# --- When a request is wrong
out=$(curl -s -X POST $OPTD/v1/sessions -H 'Content-Type: application/json' \
  -d '{"name":"e3","optimizer":"adam","lr":0.01,"size":3}')
J=$out py 'j["error"]["code"] == "unknown_field" and "\"lr\"" in j["error"]["message"] and "hyperparams" in j["error"]["message"]' "lr beside hyperparams"
out=$(curl -s -X POST $OPTD/v1/sessions -H 'Content-Type: application/json' \
  -d '{"name":"e3","optimizer":"adam","hyperparams":{"beta1":0.8},"size":3}')
J=$out py 'j["error"]["code"] == "unknown_field" and "did you mean \"betas\"?" in j["error"]["message"]' "beta1"
[ "$(curl -s -o /dev/null -w '%{http_code}' $OPTD/v1/sessions/e3)" = 404 ] || fail "e3 was created"

# --- README "Training features": a round of two workers, then the history
out=$(curl -s -X POST $OPTD/v1/sessions -H 'Content-Type: application/json' -d '{"name":"dp","optimizer":"sgd",
  "hyperparams":{"lr":0.1,"max_grad_norm":1.0,"lr_schedule":{"type":"step","step_size":100,"gamma":0.5}},
  "workers":2,"round_timeout":30,"size":3}')
J=$out py 'j["workers"] == 2 and j["hyperparams"]["max_grad_norm"] == 1.0' "create dp"
for w in 1 2; do
  curl -s -X POST $OPTD/v1/sessions/dp/step -H 'Content-Type: application/json' \
    -d "{\"grad\":[0.$w,-0.2,0.3],\"weight\":32,\"loss\":0.7$w}" > round-$w.json &
done; wait
out=$(cat round-1.json round-2.json)
J="[$(cat round-1.json),$(cat round-2.json)]" py 'j[0] == j[1] and j[0]["step"] == 1 and j[0]["contributors"] == 2' "the round's replies: $out"
out=$(curl -s "$OPTD/v1/sessions/dp/history?limit=100")
J=$out py 'len(j["history"]) == 1 and j["history"][0]["contributors"] == 2 and abs(j["history"][0]["loss"] - 0.715) < 1e-12' "dp history"

echo "cookbook ok"
