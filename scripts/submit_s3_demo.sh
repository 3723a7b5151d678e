#!/usr/bin/env bash
# The demo job through `ray job submit`, reading its prompts from a bucket and writing its output
# there: a local S3 API (moto's server) and a Ray head of this script's own, both on 127.0.0.1
# only, on ports free when it starts (none of the defaults: another Ray or S3 server may hold
# them), token auth, the head's files in a temp dir of its own.
#   make setup && bash scripts/submit_s3_demo.sh
# Stops what it started, and only that, by the processes' ids (`ray stop` would stop every Ray
# of the machine, other users' jobs included).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-$PWD/.venv/bin}
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=token
read -r S3_PORT GCS DASH CLIENT AGENT <<< "$("$BIN/python" -m spd_cluster.cluster.runtime free-ports 5)"
S3_PORT=${PORT:-$S3_PORT}
TMP=$(mktemp -d /tmp/spd-s3demo-XXXXXX)   # short: Ray's unix socket paths are limited
export AWS_ENDPOINT_URL=http://127.0.0.1:$S3_PORT AWS_ACCESS_KEY_ID=demo AWS_SECRET_ACCESS_KEY=demo \
       AWS_DEFAULT_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true

MOTO= HEAD=
cleanup() {
    if [ -n "$HEAD" ]; then kill "$HEAD" 2> /dev/null || true; wait "$HEAD" 2> /dev/null || true; fi
    if [ -n "$MOTO" ]; then kill "$MOTO" 2> /dev/null || true; wait "$MOTO" 2> /dev/null || true; fi
    rm -rf "$TMP"
}
trap cleanup EXIT

"$BIN/moto_server" -H 127.0.0.1 -p "$S3_PORT" > "$TMP/moto.log" 2>&1 &
MOTO=$!
# the head in the background, blocking: SIGTERM to that one process stops its head (and no other)
"$BIN/ray" start --head --block --node-ip-address=127.0.0.1 --dashboard-host=127.0.0.1 --num-cpus=2 \
    --port="$GCS" --dashboard-port="$DASH" --ray-client-server-port="$CLIENT" --dashboard-agent-listen-port="$AGENT" \
    --temp-dir="$TMP/ray" --disable-usage-stats > "$TMP/ray-head.log" 2>&1 &
HEAD=$!
for _ in $(seq 50); do (echo > "/dev/tcp/127.0.0.1/$S3_PORT") 2> /dev/null && break; sleep 0.2; done

# the sample prompts as a directory of two Parquet files in s3://spd-demo/prompts/
"$BIN/python" - <<'PY'
import json, os
import pyarrow as pa, pyarrow.fs as pafs, pyarrow.parquet as pq
s3 = pafs.S3FileSystem(endpoint_override=os.environ["AWS_ENDPOINT_URL"], allow_bucket_creation=True)
s3.create_dir("spd-demo")
rows = [json.loads(line) for line in open("data/sample_prompts.jsonl")]
half = len(rows) // 2
for i, part in enumerate([rows[:half], rows[half:]]):
    pq.write_table(pa.Table.from_pylist(part), f"spd-demo/prompts/part-{i}.parquet", filesystem=s3)
print(f"s3://spd-demo/prompts/: {len(rows)} prompts in 2 Parquet files")
PY

if ! "$BIN/python" -m spd_cluster.cluster.runtime wait-head "http://127.0.0.1:$DASH" --pid "$HEAD"; then
    tail -n 20 "$TMP/ray-head.log" >&2
    exit 1
fi
ENV=$(printf '{"env_vars": {"AWS_ENDPOINT_URL": "%s", "AWS_ACCESS_KEY_ID": "demo", "AWS_SECRET_ACCESS_KEY": "demo", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}}' "$AWS_ENDPOINT_URL")
"$BIN/ray" job submit --address "http://127.0.0.1:$DASH" --working-dir . --runtime-env-json "$ENV" -- \
    "$BIN/python" jobs/spd_batch.py --config configs/demo.yaml --no-progress \
    --set dataset.path=s3://spd-demo/prompts/ --set output.path=s3://spd-demo/out/demo "$@"
"$BIN/spd-cluster" status s3://spd-demo/out/demo
"$BIN/python" - <<'PY'
import os
import pyarrow.fs as pafs, pyarrow.parquet as pq
s3 = pafs.S3FileSystem(endpoint_override=os.environ["AWS_ENDPOINT_URL"])
t = pq.read_table("spd-demo/out/demo/results", filesystem=s3)
names = sorted(i.path for i in s3.get_file_info(pafs.FileSelector("spd-demo/out/demo", recursive=True)) if i.type == pafs.FileType.File)
print(f"s3://spd-demo/out/demo: {t.num_rows} rows, {len(set(t['prompt_id'].to_pylist()))} distinct prompt ids; objects:")
print("\n".join("  " + n for n in names))
PY
