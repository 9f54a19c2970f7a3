package main

import (
	"fmt"
	"net"
	"strings"
	"sync"
	"testing"
	"time"
)

func TestUsage(t *testing.T) {
	for _, tc := range []struct {
		args []string
		code int
		want string // in stderr, or stdout for help
	}{
		{nil, exitUsage, "Usage: cacheaside"},
		{[]string{"frobnicate"}, exitUsage, `unknown command "frobnicate"`},
		{[]string{"--nope", "inspect", "k"}, exitUsage, "flag provided but not defined: -nope"},
		{[]string{"inspect"}, exitUsage, "inspect takes one KEY"},
		{[]string{"inspect", "a", "b"}, exitUsage, "inspect takes one KEY"},
		{[]string{"inspect", "--timeout", "0s", "k"}, exitUsage, "--timeout must be positive"},
		{[]string{"scan"}, exitUsage, "scan takes one PREFIX"},
		{[]string{"invalidate"}, exitUsage, "invalidate needs key KEY..., prefix PREFIX, namespace NS, tag TAG... or clear"},
		{[]string{"invalidate", "everything"}, exitUsage, `invalidate "everything": want key, prefix, namespace, tag or clear`},
		{[]string{"invalidate", "key"}, exitUsage, "at least one KEY"},
		{[]string{"invalidate", "prefix", ""}, exitUsage, "one non-empty PREFIX"},
		{[]string{"invalidate", "namespace", "v1:tasks:42"}, exitUsage, `"v1:tasks:42" is not a namespace`},
		{[]string{"invalidate", "namespace", "v1:tasks:{org:a*}"}, exitUsage, `Keyspace.Namespace would spell it "v1:tasks:{org:a%2A}"`},
		{[]string{"invalidate", "--cache", "", "key", "k"}, exitUsage, "--cache must not be empty"},
		{[]string{"--redis", "http://127.0.0.1:6379", "inspect", "k"}, exitUsage, "invalid URL scheme"},
		{[]string{"--redis", "redis+cluster://a:1,b:2", "inspect", "k"}, exitUsage, "give --cluster and a redis:// URL"},
		{[]string{"-h"}, exitOK, "Usage: cacheaside"},
		{[]string{"help"}, exitOK, "Usage: cacheaside"},
	} {
		r := runCLI(t, tc.args...)
		if r.code != tc.code || !strings.Contains(r.stderr+r.stdout, tc.want) {
			t.Errorf("cacheaside %q: exit %d, output %q; want exit %d and %q", tc.args, r.code, r.stderr+r.stdout, tc.code, tc.want)
		}
	}
}

func TestParseNamespace(t *testing.T) {
	for _, s := range []string{"v1:task_lists:{org:acme}", "v12:t:{a%3Ab:c}", "v1:t:{x}:#gen"} {
		ns, err := parseNamespace(s)
		if err != nil || ns.String() != strings.TrimSuffix(s, ":#gen") {
			t.Errorf("parseNamespace(%q) = %q, %v", s, ns.String(), err)
		}
	}
	for _, s := range []string{"", "tasks:{a}", "v0:t:{a}", "vx:t:{a}", "v1:T:{a}", "v1:t:{a}:page", "v1:t:{}", "v01:t:{a}", "v1:t:{a%zz}"} {
		if _, err := parseNamespace(s); err == nil {
			t.Errorf("parseNamespace(%q) accepted it", s)
		}
	}
}

func TestInspectForeign(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		b.rdb.Set(ctx, b.ks.Key("text"), "hello world", 0)
		b.rdb.Set(ctx, b.ks.Key("short"), "\xca\x02abc", 0)
		b.rdb.Set(ctx, b.ks.Key("v9"), "\xca\x09"+strings.Repeat("x", 60), 0)
		b.rdb.Set(ctx, b.ks.Key("empty"), "", 0)
		b.rdb.HSet(ctx, b.ks.Key("hash"), "field", "1")
		b.rdb.RPush(ctx, b.ks.Key("list"), "1")
		for _, tc := range []struct{ key, want string }{
			{"missing", ": no such key"},
			{"text", `not a cacheaside entry (first byte 0x68, an entry starts with 0xca); 11 bytes, first bytes: "hello world"`},
			{"short", `not a cacheaside entry (entry shorter than its header); 5 bytes, first bytes: "\xca\x02abc"`},
			{"v9", `not a cacheaside entry (unknown entry format version 9 (this build reads 2)); 62 bytes, first bytes: "\xca\txxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"...`},
			{"empty", "not a cacheaside entry (empty string)"},
			{"hash", "holds a Redis hash, not a string: not a cacheaside entry"},
			{"list", "holds a Redis list, not a string: not a cacheaside entry"},
		} {
			r := b.cli(t, "inspect", b.ks.Key(tc.key))
			if r.code != exitError || !strings.Contains(r.stderr, b.ks.Key(tc.key)+": ") || !strings.Contains(r.stderr, tc.want) {
				t.Errorf("inspect %s: exit %d, stderr %q; want exit 1 and %q", tc.key, r.code, r.stderr, tc.want)
			}
		}
	})
}

// TestUnreachable: a port nothing listens on fails at once; a server that
// accepts connections and never answers fails at --timeout.
func TestUnreachable(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := l.Addr().String()
	_ = l.Close()

	hole, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var conns []net.Conn
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := hole.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
		}
	}()
	defer func() {
		_ = hole.Close()
		wg.Wait()
		mu.Lock()
		for _, c := range conns {
			_ = c.Close()
		}
		mu.Unlock()
	}()

	for _, tc := range []struct {
		name string
		args []string
		want string
		max  time.Duration
	}{
		{"refused", []string{"--redis", "redis://" + closed, "inspect", "k"}, "cannot reach Redis at redis://" + closed + ": dial tcp", 2 * time.Second},
		{"refused-cluster", []string{"--cluster", "--redis", "redis://" + closed, "scan", "k"}, "cannot reach Redis at redis://" + closed, 2 * time.Second},
		{"black-hole", []string{"--timeout", "300ms", "--redis", "redis://" + hole.Addr().String(), "invalidate", "key", "k"}, "ms (--timeout 300ms)", 2 * time.Second},
		{"black-hole-cluster", []string{"--cluster", "--timeout", "300ms", "--redis", "redis://" + hole.Addr().String(), "inspect", "k"}, "ms (--timeout 300ms)", 2 * time.Second},
		{"password-hidden", []string{"--redis", "redis://user:secret@" + closed, "inspect", "k"}, "redis://user:xxxxx@" + closed, 2 * time.Second},
	} {
		start := time.Now()
		r := runCLI(t, tc.args...)
		took := time.Since(start)
		if r.code != exitError || !strings.Contains(r.stderr, tc.want) || strings.Contains(r.stderr, "secret") ||
			strings.Contains(tc.want, "--timeout") && !strings.Contains(r.stderr, ": no answer after ") {
			t.Errorf("%s: exit %d, stderr %q; want exit 1 and %q", tc.name, r.code, r.stderr, tc.want)
		}
		if took > tc.max {
			t.Errorf("%s: took %v, want under %v", tc.name, took, tc.max)
		}
	}
}

// TestWrongClientKind: --cluster on a standalone server, and a standalone
// client on a cluster node, fail with a hint.
func TestWrongClientKind(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		switch b.name {
		case "redis":
			flags := append(append([]string{}, b.flags...), "--cluster", "inspect", b.ks.Key("x"))
			if r := runCLI(t, flags...); r.code != exitError || !strings.Contains(r.stderr, "drop --cluster") {
				t.Errorf("--cluster on a standalone server: exit %d, %q", r.code, r.stderr)
			}
		case "cluster":
			addrs := clusterAddrs(t)
			hinted := false
			for i := 0; i < 20 && !hinted; i++ {
				r := runCLI(t, "--redis", "redis://"+addrs[0], "inspect", b.ks.Key(fmt.Sprint(i)))
				hinted = r.code == exitError && strings.Contains(r.stderr, "MOVED") && strings.Contains(r.stderr, "add --cluster")
			}
			if !hinted {
				t.Errorf("no key of 20 on another node was answered with a hint to add --cluster")
			}
		default:
			t.Skip("miniredis answers both kinds of client")
		}
	})
}
