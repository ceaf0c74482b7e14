"""A time-stamping authority made in the tests: a CA and a TSA certificate it issued (EC P-256, critical
timeStamping EKU), with openssl's own TSA (``openssl ts -reply``) answering queries."""

from __future__ import annotations

import subprocess
from pathlib import Path

TSA_CNF = """\
[ tsa ]
default_tsa = tsa_config1
[ tsa_config1 ]
dir = {dir}
serial = $dir/tsaserial
crypto_device = builtin
signer_digest = sha256
default_policy = 1.2.3.4.1
digests = sha256
accuracy = secs:1
ordering = yes
tsa_name = yes
ess_cert_id_chain = no
ess_cert_id_alg = sha256
"""
TSA_EXT = "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=critical,timeStamping\n"


def ssl(*args: str | Path, cwd: Path) -> str:
    """``openssl ARGS`` in ``cwd``; its stdout."""
    return subprocess.run(["openssl", *map(str, args)], cwd=cwd, check=True, capture_output=True, text=True).stdout


def make_pki(folder: Path, name: str) -> Path:
    """``folder`` with ca.crt/ca.key, tsa.crt/tsa.key issued by it, and tsa.cnf for ``openssl ts``."""
    folder.mkdir()
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")
    ca_ext = ("-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    ssl("req", "-x509", *ec, *ca_ext, "-keyout", "ca.key", "-out", "ca.crt", "-subj", f"/CN={name} CA", cwd=folder)
    ssl("req", *ec, "-keyout", "tsa.key", "-out", "tsa.csr", "-subj", f"/O=clue2geo tests/CN={name} TSA", cwd=folder)
    (folder / "tsa.ext").write_text(TSA_EXT)
    ssl("x509", "-req", "-in", "tsa.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-set_serial", "7", "-days", "30",
        "-extfile", "tsa.ext", "-out", "tsa.crt", cwd=folder)  # fmt: skip
    (folder / "tsaserial").write_text("01\n")
    (folder / "tsa.cnf").write_text(TSA_CNF.format(dir=folder))
    return folder


def answer(tsq: Path, pki: Path, tsr: Path) -> Path:
    """What a TSA sends back for ``tsq`` (openssl's TSA, signed with ``pki``'s TSA key), saved as ``tsr``."""
    ssl("ts", "-reply", "-config", pki / "tsa.cnf", "-queryfile", tsq, "-inkey", pki / "tsa.key",
        "-signer", pki / "tsa.crt", "-chain", pki / "ca.crt", "-out", tsr, cwd=pki)  # fmt: skip
    return tsr
