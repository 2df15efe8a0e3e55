#!/usr/bin/env python3
"""Turns a file into a C source defining a byte array and its length (build-time embedding).

usage: embed.py INPUT OUTPUT SYMBOL
"""
import sys


def main() -> int:
    if len(sys.argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    src, dst, sym = sys.argv[1:]
    data = open(src, "rb").read()
    with open(dst, "w") as out:
        out.write("/* Generated from %s by scripts/embed.py; do not edit. */\n" % src.split("/")[-1])
        out.write("#include <stddef.h>\n\n")
        out.write("extern const unsigned char %s[];\nextern const size_t %s_len;\n\n" % (sym, sym))
        out.write("const unsigned char %s[] = {\n" % sym)
        for i in range(0, len(data), 16):
            out.write("    " + ", ".join("0x%02x" % b for b in data[i:i + 16]) + ",\n")
        out.write("    0x00\n};\n")
        out.write("const size_t %s_len = %d;\n" % (sym, len(data)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
