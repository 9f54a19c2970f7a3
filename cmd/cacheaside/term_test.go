package main

import (
	"strings"
	"testing"
)

func TestTermSafe(t *testing.T) {
	for in, want := range map[string]string{
		"v1:tasks:42":             "v1:tasks:42",
		"héllo wörld":             "héllo wörld",
		"a\x1b]0;owned\x07b":      `a\x1b]0;owned\ab`,
		"\x1b[2J":                 `\x1b[2J`,
		"raw C1 \x9b1m":           `raw C1 \x9b1m`,
		"C1 as UTF-8 \u009b":      `C1 as UTF-8 \u009b`,
		"bidi \u202eevil":         `bidi \u202eevil`,
		"del\x7f":                 `del\x7f`,
		"nul\x00":                 `nul\x00`,
		"tab\tand newline\n kept": "tab\tand newline\n kept",
	} {
		if got := termSafe(in); got != want {
			t.Errorf("termSafe(%q) = %q, want %q", in, got, want)
		}
	}
}

// TestOutputEscaped: keys and values holding terminal escape sequences
// reach the terminal escaped, through scan, inspect and errors.
func TestOutputEscaped(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		evil := b.ks.Prefix("evil") + "\x1b]0;title\x07\x9b2J"
		b.rdb.Set(ctx, evil, "not an entry \x1b[2J", 0)
		for _, args := range [][]string{{"scan", b.ks.Prefix("evil")}, {"inspect", evil}, {"inspect", evil + "\x1b[31m-missing"}} {
			r := b.cli(t, args...)
			out := r.stdout + r.stderr
			if strings.ContainsAny(out, "\x1b\x07") || strings.IndexByte(out, 0x9b) >= 0 || !strings.Contains(out, `\x1b`) {
				t.Errorf("%s: output not escaped: %q", args[0], out)
			}
		}
	})
}
