"""Unpack OHIF's prebuilt viewer (npm's @ohif/app tarball, `npm pack @ohif/app@VERSION`) into /usr/share/ohif,
after checking its SHA-512 against the pinned one.  python3 fetch_ohif.py TARBALL SHA512"""
import hashlib
import shutil
import sys
import tarfile

tarball, expected = sys.argv[1], sys.argv[2].lower()
with open(tarball, "rb") as f:
    found = hashlib.sha512(f.read()).hexdigest()
if found != expected:
    sys.exit(f"{tarball}: SHA-512 {found[:16]}... is not the pinned {expected[:16]}... (OHIF_VERSION and OHIF_SHA512 "
             "must name the same release)")
with tarfile.open(tarball) as tar:
    members = [m for m in tar.getmembers() if m.name.startswith("package/dist/") and (m.isfile() or m.isdir())]
    tar.extractall("/tmp/ohif", members=members)
shutil.move("/tmp/ohif/package/dist", "/usr/share/ohif")
shutil.rmtree("/tmp/ohif")
