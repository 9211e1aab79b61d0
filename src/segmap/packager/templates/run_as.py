"""The root step of a segmap MAP's entry point: who runs the application, and outputs a root-owned folder can take.

The image starts as root because MAIA's plain ``docker run -v IN:... -v OUT:... IMAGE`` has no ``--user``; the entry
point (/var/holoscan/tools) runs this file at once, as ``python3 -I -S run_as.py RUN_AS FOLDER SCRIPT ARGS...``
(RUN_AS: /etc/holoscan/run-as, the image's non-root default ``uid:gid``; FOLDER: the folder the command writes).
The application never runs as root:

- FOLDER owned by someone (not root), missing, or a command that writes no run output (show, env, extract): switch
  groups, gid and uid to FOLDER's owner (or the default) and re-run SCRIPT in this process. Outputs belong to whoever
  owns the host folder.
- FOLDER owned by root (``mkdir`` as root) and writable by the default user (mode 1777, an ACL): the same switch.
- FOLDER owned by root and not writable by the default user (mode 755): this process stays root as a supervisor. It
  locks FOLDER (one run per folder, the lock the application takes itself), makes a private ``.segmap-handoff-*``
  folder inside it owned by the default user, and runs SCRIPT in a child process that switches to that user first
  and writes into the handoff folder. SIGTERM and SIGINT are forwarded to the child (its own process group: each
  signal reaches it once), whose exit code becomes the container's (143 after docker stop). Only when the child
  succeeded, the supervisor moves the outputs into FOLDER and gives them FOLDER's owner, the report last (as the
  application commits its own): regular files with one link and folders the child made, nothing else (a link, a
  device, a hard link refuse the hand-over and move nothing), never following a symbolic link, without setuid,
  setgid or sticky bits. The handoff folder is removed on every path; one left by a killed container goes at the
  next run into the same folder.

Without CAP_SETUID/CAP_SETGID (``--cap-drop ALL`` without ``--user``) no switch is possible: the run is refused
with what to pass instead, before anything is written. ``--user UID:GID`` never reaches this file.
"""

import fcntl
import os
import shutil
import signal
import stat
import sys
import tempfile

HANDOFF_PREFIX = ".segmap-handoff-"
#: The application's own bookkeeping (lock file, staging folders): never handed over.
PRIVATE_PREFIX = ".segmap-"
#: Moved last, so that whoever waits for the report finds every other output in place (segmap.outputs.report).
REPORT_NAME = "run_report.json"
#: Entry point commands that write no run output (the tools script's own).
NOT_A_RUN = ("show", "env", "extract")
OUTPUT_FLAGS = ("-o", "--output")


class Refused(Exception):
    """A one-line reason the run cannot go on; printed as ``segmap: error: ...``, exit code 2."""


def default_ids(run_as_file):
    uid, gid = (int(x) for x in open(run_as_file).read().strip().split(":"))
    return uid, gid


def switch_to(uid, gid):
    """Drop root for good in this process: supplementary groups, gid, uid (in that order)."""
    try:
        os.setgroups([gid])
        os.setgid(gid)
        os.setuid(uid)
    except PermissionError:
        raise Refused(f"the container starts as root but cannot switch to uid {uid} (no CAP_SETUID or CAP_SETGID, "
                      "e.g. --cap-drop ALL): pass --user UID:GID with a uid that may write the output folder") from None


def may_write(uid, gid, folder):
    """Whether ``uid:gid`` may create files in ``folder`` (mode bits, ACLs, read-only mounts): asked in a child
    that switches to that user, since only the kernel knows. Raises :class:`Refused` when no switch is possible."""
    pid = os.fork()
    if pid == 0:
        try:
            switch_to(uid, gid)
        except Refused:
            os._exit(3)
        os._exit(0 if os.access(folder, os.W_OK | os.X_OK) else 1)
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    if code == 3:
        switch_to(uid, gid)  # fails the same way here, with the message
    return code == 0


def with_output(args, folder):
    """``args`` with the output folder's value replaced by ``folder`` (when given as -o/--output), and whether it
    was."""
    out, replaced, i = list(args), False, 0
    while i < len(out):
        arg = out[i]
        if arg in OUTPUT_FLAGS and i + 1 < len(out):
            out[i + 1], replaced = folder, True
            i += 1
        elif arg.startswith("--output="):
            out[i], replaced = "--output=" + folder, True
        elif arg.startswith("-o") and len(arg) > 2 and not arg.startswith("--"):
            out[i], replaced = "-o" + folder, True
        i += 1
    return out, replaced


def lock(folder):
    """An exclusive lock on ``folder`` (the one the application takes: segmap.outputs.atomic), or None where the
    file system cannot lock a folder."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise Refused(f"{folder}: another segmap run is writing into this output folder; wait for it to finish or "
                      "choose another output folder") from None
    except OSError:
        os.close(fd)
        return None
    return fd


def remove_stale_handoffs(folder):
    """Handoff folders of containers killed outright (SIGKILL); call only while holding ``folder``'s lock."""
    for entry in os.scandir(folder):
        if entry.name.startswith(HANDOFF_PREFIX) and entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)


def make_handoff(folder, uid, gid):
    try:
        handoff = tempfile.mkdtemp(prefix=HANDOFF_PREFIX, dir=folder)
    except OSError as e:
        raise Refused(f"{folder}: output folder is not writable ({e.strerror or e})") from None
    try:
        os.chown(handoff, uid, gid, follow_symlinks=False)
    except OSError as e:
        os.rmdir(handoff)
        raise Refused(f"{folder}: cannot give uid {uid} a folder to write in ({e.strerror or e}; CAP_CHOWN is "
                      "needed, e.g. not --cap-drop ALL): pass --user UID:GID with a uid that may write the output "
                      "folder") from None
    return handoff


def outputs_of(handoff, uid):
    """The folders and files the child left in ``handoff`` (paths relative to it), checked: regular files with one
    link and folders, all owned by ``uid``; anything else raises :class:`Refused` naming it."""
    folders, files = [], []

    def walk(rel):
        with os.scandir(os.path.join(handoff, rel)) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            if entry.name.startswith(PRIVATE_PREFIX):
                continue
            path = os.path.join(rel, entry.name)
            st = os.lstat(entry.path)
            if st.st_uid != uid:
                raise Refused(f"{path}: not made by the run (owned by uid {st.st_uid}); nothing was moved")
            if stat.S_ISDIR(st.st_mode):
                folders.append(path)
                walk(path)
            elif stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
                files.append(path)
            else:
                raise Refused(f"{path}: not a regular file or folder (a link or a special file); nothing was moved")

    walk("")
    files.sort(key=lambda p: (os.path.basename(p) == REPORT_NAME, p))
    return folders, files


def hand_over(handoff, folder, uid, owner):
    """Move what the child (``uid``) wrote in ``handoff`` into ``folder``, owned by ``owner`` (uid, gid); returns
    the moved files' paths relative to ``folder``."""
    folders, files = outputs_of(handoff, uid)
    for rel in [*folders, *files]:  # everything in the way is found before anything moves
        try:
            st = os.lstat(os.path.join(folder, rel))
        except FileNotFoundError:
            continue
        is_folder = rel in folders
        if stat.S_ISDIR(st.st_mode) != is_folder or (not is_folder and not stat.S_ISREG(st.st_mode)):
            raise Refused(f"{os.path.join(folder, rel)}: in the way of an output of the same name (a "
                          f"{'folder' if stat.S_ISDIR(st.st_mode) else 'file or link'}); nothing was moved")
    for rel in folders:
        target = os.path.join(folder, rel)
        if not os.path.lexists(target):
            os.mkdir(target, stat.S_IMODE(os.lstat(os.path.join(handoff, rel)).st_mode) & 0o777)
            os.chown(target, *owner, follow_symlinks=False)
    for rel in files:
        source, target = os.path.join(handoff, rel), os.path.join(folder, rel)
        fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_uid != uid:
                raise Refused(f"{rel}: changed while being handed over; nothing more was moved")
            os.fchown(fd, *owner)
            os.fchmod(fd, st.st_mode & 0o777)
            os.replace(source, target)
            if os.lstat(target).st_ino != st.st_ino:  # the name was swapped between the check and the move
                os.unlink(target)
                raise Refused(f"{rel}: changed while being handed over; nothing more was moved")
        finally:
            os.close(fd)
    return files


def supervise(folder, uid, gid, script, args):
    """Run ``script args`` as ``uid:gid`` in a child writing into a handoff folder inside the root-owned ``folder``;
    hand its outputs over when it succeeds. Returns the exit code."""
    owner = (os.lstat(folder).st_uid, os.lstat(folder).st_gid)
    forwarded = (signal.SIGTERM, signal.SIGINT)
    # Blocked until the child's pid is known, so that a signal arriving meanwhile is forwarded, not lost, and cannot
    # end this process between making the handoff folder and the clean-up that removes it.
    signal.pthread_sigmask(signal.SIG_BLOCK, forwarded)
    lock_fd = lock(folder)
    if lock_fd is not None:
        remove_stale_handoffs(folder)
    handoff = make_handoff(folder, uid, gid)
    try:
        args, replaced = with_output(args, handoff)
        env = dict(os.environ)
        if not replaced:
            env["HOLOSCAN_OUTPUT_PATH"] = handoff
        pid = os.fork()
        if pid == 0:
            try:
                os.setpgid(0, 0)
                for sig in forwarded:
                    signal.signal(sig, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, forwarded)
                switch_to(uid, gid)
                os.execve(script, [script, *args], env)
            except Refused as e:
                sys.stderr.write(f"segmap: error: {e}\n")
            except OSError as e:
                sys.stderr.write(f"segmap: error: cannot start {script} ({e.strerror or e})\n")
            finally:
                os._exit(2)  # never back into the supervisor's code
        try:
            os.setpgid(pid, pid)
        except OSError:
            pass  # the child did it first, or has already exec'd

        def forward(sig, frame):
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                pass

        for sig in forwarded:
            signal.signal(sig, forward)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, forwarded)
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        for sig in forwarded:
            signal.signal(sig, signal.SIG_IGN)  # the hand-over and the clean-up take milliseconds: let them finish
        try:
            os.killpg(pid, signal.SIGKILL)  # whatever the child left running cannot touch the handoff any more
        except (ProcessLookupError, PermissionError):
            pass
        if code < 0:
            code = 128 - code
        if code == 0:
            try:
                hand_over(handoff, folder, uid, owner)
            except OSError as e:
                raise Refused(f"{folder}: cannot move the outputs into place ({e.strerror or e})") from None
        return code
    finally:
        shutil.rmtree(handoff, ignore_errors=True)
        if lock_fd is not None:
            os.close(lock_fd)


def main(argv):
    run_as_file, folder, script, *args = argv
    uid, gid = default_ids(run_as_file)
    try:
        st = os.stat(folder)
    except OSError:
        st = None
    run = not args or args[0] not in NOT_A_RUN
    if st is not None and st.st_uid != 0:
        uid, gid = st.st_uid, (st.st_gid or gid)
    elif st is not None and stat.S_ISDIR(st.st_mode) and run and not may_write(uid, gid, folder):
        return supervise(folder, uid, gid, script, args)
    switch_to(uid, gid)
    os.execv(script, [script, *args])


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except Refused as e:
        sys.stderr.write(f"segmap: error: {e}\n")
        sys.exit(2)
