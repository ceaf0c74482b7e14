#!/usr/bin/env bash
# The README's "Evidence workflow", start to finish, on a copy of a bundle (default: the demo bundle),
# with throwaway keys and a local time-stamping authority played by `openssl ts -reply`.
#
#   bash examples/evidence_workflow.sh [BUNDLE] [WORKDIR]
#
# Every step is the command an examiner types; only the TSA (a networked service in real life) is
# simulated. On the demo bundle the numbers are meaningless (random-weight models).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
bundle_src=${1:-artifacts/demo}
work=${2:-$(mktemp -d)}
mkdir -p "$work"
cd "$work"
echo "working in $work"

# A copy of the bundle that the lab may change (hard links: attaching rewrites files by renaming)
cp -al "$(realpath "$bundle_src")" B 2>/dev/null || cp -r "$(realpath "$bundle_src")" B
mkdir -p evidence case
cp "$here/images/"*.jpg "$here/images/"*.png evidence/

# Keys: the lab's (signs bundles) and the examiner's (signs results)
clue2geo bundle keygen lab.key >/dev/null
clue2geo bundle keygen examiner.key >/dev/null

# A local TSA: a CA and a time-stamping certificate it issued
ec=(-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes)
openssl req -x509 "${ec[@]}" -keyout tsa-ca.key -out tsa-cacert.pem -subj "/CN=Example TSA CA" \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
openssl req "${ec[@]}" -keyout tsa.key -out tsa.csr -subj "/O=Example/CN=Example TSA" 2>/dev/null
printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=critical,timeStamping\n' >tsa.ext
openssl x509 -req -in tsa.csr -CA tsa-cacert.pem -CAkey tsa-ca.key -set_serial 7 -days 30 -extfile tsa.ext \
    -out tsa.crt 2>/dev/null
echo 01 >tsaserial
cat >tsa.cnf <<EOF
[ tsa ]
default_tsa = tsa1
[ tsa1 ]
dir = $work
serial = \$dir/tsaserial
crypto_device = builtin
signer_digest = sha256
default_policy = 1.2.3.4.1
digests = sha256
accuracy = secs:1
tsa_name = yes
ess_cert_id_chain = no
ess_cert_id_alg = sha256
EOF

# A small validation set: path,lat,lon (two photos whose place is known)
cat >validation-set.csv <<EOF
path,lat,lon
evidence/summer_palace_beijing.jpg,39.9999,116.2750
evidence/kauai.png,22.0964,-159.5261
EOF

fast=(--max-cue-tokens 96 --max-answer-tokens 48)  # short generations: the demo's random VLM babbles

echo "== 1. the tool"
clue2geo bundle sign B --key lab.key
clue2geo bundle verify B --trusted-key lab.key.pub
clue2geo bundle selftest B

echo "== 2. its known error rate"
clue2geo validate B validation-set.csv --out val/ --min-group 1 "${fast[@]}" || [ $? -eq 3 ]
clue2geo bundle attach-validation B val/
clue2geo bundle sign B --key lab.key

echo "== 3. the case"
clue2geo locate evidence/ --bundle B --trusted-key lab.key.pub --hash sha3-512 "${fast[@]}" \
    --out case/results.jsonl --report case/report.html
clue2geo audit stamp-request case/results.jsonl
openssl ts -reply -config tsa.cnf -queryfile case/results.jsonl.tsq -inkey tsa.key -signer tsa.crt \
    -chain tsa-cacert.pem -out case/results.jsonl.tsr 2>/dev/null   # what the TSA sends back
clue2geo audit stamp-verify case/results.jsonl --tsr case/results.jsonl.tsr --ca tsa-cacert.pem
clue2geo report case/results.jsonl --bundle B --tsa-ca tsa-cacert.pem --out case/report.html
clue2geo audit sign case/results.jsonl --key examiner.key --examiner "A. Analyst" --case C-17 \
    --report case/report.html

echo "== 4. hand-over"
clue2geo export case/results.jsonl --to case/results.kmz --image-root evidence/
clue2geo export case/results.jsonl --to case/results.jsonld

echo "== 5. whoever receives it"
clue2geo audit verify case/results.jsonl --trusted-key examiner.key.pub --report case/report.html
echo "done: $work/case (report.html, results.kmz, results.jsonld), $work/val/validation.html"
