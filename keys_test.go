package cacheaside

import (
	"context"
	"errors"
	"github.com/seed-b4ec662f/cacheaside/internal/wire"
	"strings"
	"testing"
	"time"
)

func TestKeyspaceKeys(t *testing.T) {
	tasks := MustKeyspace("tasks", 1)
	cases := []struct {
		name string
		got  string
		want string
	}{
		{"single id", tasks.Key("42"), "v1:tasks:42"},
		{"list page", tasks.Key("org", "acme", "status", "done", "page", "2", "size", "20"), "v1:tasks:org:acme:status:done:page:2:size:20"},
		{"no parts", tasks.Key(), "v1:tasks"},
		{"colon in data", tasks.Key("org", "acme:status:done"), "v1:tasks:org:acme%3Astatus%3Adone"},
		{"glob in data", tasks.Key("org", "a*b?[c]\\"), "v1:tasks:org:a%2Ab%3F%5Bc%5D%5C"},
		{"percent in data", tasks.Key("org", "100%"), "v1:tasks:org:100%25"},
		{"hash tag braces", tasks.Key("org", "{x}"), "v1:tasks:org:%7Bx%7D"},
		{"space and control", tasks.Key("q", "a b\n"), "v1:tasks:q:a%20b%0A"},
		{"utf-8 kept", tasks.Key("org", "zürich"), "v1:tasks:org:zürich"},
		{"empty part", tasks.Key("org", "", "x"), "v1:tasks:org::x"},
		{"prefix", tasks.Prefix("org", "acme"), "v1:tasks:org:acme:"},
		{"whole keyspace prefix", tasks.Prefix(), "v1:tasks:"},
		{"version 2", MustKeyspace("tasks", 2).Key("42"), "v2:tasks:42"},
		{"string", tasks.String(), "v1:tasks"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if tc.got != tc.want {
				t.Fatalf("got %q, want %q", tc.got, tc.want)
			}
		})
	}
}

func TestKeyspaceRejectsBadNames(t *testing.T) {
	for _, tc := range []struct {
		name    string
		version int
	}{{"", 1}, {"Tasks", 1}, {"a:b", 1}, {"a*", 1}, {strings.Repeat("a", 65), 1}, {"tasks", 0}, {"tasks", -1}} {
		if _, err := NewKeyspace(tc.name, tc.version); !errors.Is(err, ErrInvalidKey) {
			t.Errorf("NewKeyspace(%q, %d) = %v, want ErrInvalidKey", tc.name, tc.version, err)
		}
	}
	defer func() {
		if recover() == nil {
			t.Error("zero Keyspace did not panic")
		}
	}()
	Keyspace{}.Key("x")
}

// TestPrefixNeverWidens: the prefix of one org, used as a SCAN MATCH
// pattern on Redis, finds that org's keys and no other org's, whatever the
// names contain.
func TestPrefixNeverWidens(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		rdb := b.client(t)
		ks := MustKeyspace("tasks", 1)
		orgs := []string{"acme", "acme2", "ac*", "a?me", "[a]cme", "acme:status", "acme\\", "*", "?", "[", ":", "", "%41cme", "Acme", "{acme}"}
		owner := map[string]string{}
		for _, org := range orgs {
			key := b.key(ks.Key("org", org, "status", "done", "page", "1"))
			owner[key] = org
			if err := rdb.Set(ctx, key, "x", time.Minute).Err(); err != nil {
				t.Fatal(err)
			}
		}
		for _, org := range orgs {
			pattern := wire.EscapeGlob(b.key(ks.Prefix("org", org))) + "*"
			var found []string
			iter := rdb.Scan(ctx, 0, pattern, 1000).Iterator()
			for iter.Next(ctx) {
				found = append(found, iter.Val())
			}
			if err := iter.Err(); err != nil {
				t.Fatal(err)
			}
			if len(found) != 1 || owner[found[0]] != org {
				t.Errorf("SCAN MATCH %q for org %q found %q", pattern, org, found)
			}
		}
	})
}

func TestEscapePartRoundTrip(t *testing.T) {
	for _, s := range []string{"", "plain", "a:b", "%", "%%3A", "*?[]\\{}", "x y\t\x00\x7f", "ünï"} {
		e := wire.EscapePart(s)
		if strings.ContainsAny(e, ":*?[]\\{}# ") {
			t.Errorf("wire.EscapePart(%q) = %q still holds a structural character", s, e)
		}
		back, err := wire.UnescapePart(e)
		if err != nil || back != s {
			t.Errorf("wire.UnescapePart(wire.EscapePart(%q)) = %q, %v", s, back, err)
		}
	}
	for _, bad := range []string{"%", "%4", "%zz", "a%G1"} {
		if _, err := wire.UnescapePart(bad); err == nil {
			t.Errorf("wire.UnescapePart(%q) succeeded, want an error", bad)
		}
	}
}

func TestEscapeGlob(t *testing.T) {
	for in, want := range map[string]string{
		"v1:tasks:":  "v1:tasks:",
		"a*b":        `a\*b`,
		"[x]?":       `\[x\]\?`,
		`back\slash`: `back\\slash`,
	} {
		if got := wire.EscapeGlob(in); got != want {
			t.Errorf("wire.EscapeGlob(%q) = %q, want %q", in, got, want)
		}
	}
}

func FuzzKeyspaceKey(f *testing.F) {
	for _, s := range []string{"acme", "a:b", "*", "%3A", "", "{x}", "\x00"} {
		f.Add(s, "done")
	}
	tasks := MustKeyspace("tasks", 1)
	f.Fuzz(func(t *testing.T, a, b string) {
		k := tasks.Key("org", a, "status", b)
		parts := strings.Split(k, ":")
		if len(parts) != 6 || parts[0] != "v1" || parts[1] != "tasks" || parts[2] != "org" || parts[4] != "status" {
			t.Fatalf("Key(%q, %q) = %q: data changed the structure", a, b, k)
		}
		if strings.ContainsAny(k, "*?[]\\{}#") {
			t.Fatalf("Key(%q, %q) = %q holds a glob or hash-tag character", a, b, k)
		}
		ga, err1 := wire.UnescapePart(parts[3])
		gb, err2 := wire.UnescapePart(parts[5])
		if err1 != nil || err2 != nil || ga != a || gb != b {
			t.Fatalf("round trip of %q, %q gave %q, %q (%v, %v)", a, b, ga, gb, err1, err2)
		}
		if tasks.Key("org", a) != tasks.Key("org", b) && a == b {
			t.Fatal("same part, different keys")
		}
		p := tasks.Prefix("org", a)
		if !strings.HasPrefix(tasks.Key("org", a, "x"), p) {
			t.Fatalf("Key does not start with its Prefix")
		}
		if a != b && strings.HasPrefix(tasks.Key("org", b, "x"), p) {
			t.Fatalf("prefix of %q covers key of %q", a, b)
		}
	})
}
