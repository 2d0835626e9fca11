#!/usr/bin/env python3
"""For `scripts/demo.sh --try`: turns the commands shown in text (the demo's own, and the
leading comments of policies/*.yaml) into a bash script that runs each one and prints the
HTTP status codes it got beside what the text says (`-> 200, ...`). A command is an
indented line starting with `curl`, `for` or `NAME=$(`; a line ending in `\\` continues on
the next; `(twice)` runs it twice. Exits non-zero at the end if a status differs.

usage: demo_commands.py [--stdin LABEL] FILE...
  standard input (all of it, labelled LABEL) first, then the leading `#` comment block of
  each FILE.
"""
import re
import shlex
import sys

COMMAND = re.compile(r"^\s{2,}((?:curl |for |[A-Z_]+=\$\().*)$")
CODES = re.compile(r"^((?:[1-5]\d\d[ ,]*)+)")


def commands(label, lines):
    out = []
    i = 0
    while i < len(lines):
        m = COMMAND.match(lines[i])
        i += 1
        if not m:
            continue
        cmd = m.group(1).rstrip()
        while cmd.endswith("\\") and i < len(lines):
            cmd = cmd[:-1].rstrip() + " " + lines[i].strip()
            i += 1
        expect = ""
        if " -> " in cmd:
            cmd, expect = cmd.split(" -> ", 1)
        elif i < len(lines) and lines[i].strip().startswith("->"):
            expect = lines[i].strip()[2:]
        times = 2 if "(twice)" in cmd else 1
        cmd = re.sub(r"\s*\(twice\).*$", "", cmd).strip()
        out.append((label, cmd, expect.strip(), times))
    return out


def leading_comments(path):
    block = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.startswith("#"):
                break
            block.append(line[1:].rstrip("\n"))
    return block


def main(argv):
    found = []
    if len(argv) >= 2 and argv[0] == "--stdin":
        found = commands(argv[1], sys.stdin.read().splitlines())
        argv = argv[2:]
    for path in argv:
        found += commands(path, leading_comments(path))
    print("set -u")
    print("try_curl() { command curl -s -o /dev/null -w '%{http_code} ' --max-time 10 \"$@\"; }")
    print("mismatches=0")
    label = None
    for src, cmd, expect, times in found:
        if src != label:
            print(f"printf '\\n== %s\\n' {shlex.quote(src)}")
            label = src
        print(f"printf '$ %s\\n' {shlex.quote(cmd)}")
        if re.match(r"^[A-Z_]+=\$\(", cmd):
            # An assignment later commands use: run as written, in this shell.
            print(cmd)
            name = cmd.split("=", 1)[0]
            print(f'if [[ -n "${{{name}:-}}" ]]; then echo "   {name} set"; '
                  f'else echo "   {name} EMPTY"; mismatches=$((mismatches+1)); fi')
            continue
        run = re.sub(r"(^|;\s*do\s+|&&\s*)curl ", r"\1try_curl ", cmd)
        want = CODES.match(expect)
        want = " ".join(re.findall(r"\d{3}", want.group(1))) if want else ""
        print("got=''")
        for _ in range(times):
            print(f'got="$got$( {run} 2>&1 )"')
        print('got="$(echo $got)"')
        if want:
            print(f'if [[ "$got" == {shlex.quote(want)} ]]; then mark=ok; '
                  f'else mark=MISMATCH; mismatches=$((mismatches+1)); fi')
        else:
            print("mark=")
        print(f'printf "   got %s   (says: %s) %s\\n" "$got" {shlex.quote(expect or "-")} "$mark"')
    print('printf "\\n%s command(s) answered otherwise than their text says\\n" "$mismatches"')
    print("exit $((mismatches > 0))")


if __name__ == "__main__":
    main(sys.argv[1:])
