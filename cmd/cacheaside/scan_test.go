package main

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/seed-b4ec662f/cacheaside"
)

func TestScan(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		c := newCache(t, b, &cacheaside.Options[string]{Policy: cacheaside.Policy{TTL: time.Minute}})
		nc := newCache(t, b, &cacheaside.Options[string]{Name: b.cacheName + "-ns", Namespaced: true})
		var n atomic.Int64
		mustGet(t, c, b.ks.Key("t", "1"), load("one", &n))
		mustGet(t, c, b.ks.Key("t", "2"), load("two", &n))
		if _, err := c.Get(ctx, b.ks.Key("t", "404"), func(context.Context) (string, error) { return "", cacheaside.ErrNotFound }); !errors.Is(err, cacheaside.ErrNotFound) {
			t.Fatal(err)
		}
		ns := b.ks.Namespace("t", "org")
		mustGet(t, nc, ns.Key("page", "1"), load("p1", &n))
		outside := b.ks.String() + "x:1" // does not start with the keyspace's prefix "v1:cli-…:"
		mustGet(t, c, outside, load("not under the prefix", &n))
		t.Cleanup(func() { b.rdb.Del(ctx, outside) })

		// A load in progress: its key holds a lease.
		started, release := make(chan struct{}), make(chan struct{})
		var once sync.Once
		var wg sync.WaitGroup
		defer wg.Wait()
		defer once.Do(func() { close(release) })
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, _ = c.Get(ctx, b.ks.Key("t", "slow"), func(context.Context) (string, error) {
				close(started)
				<-release
				return "slow", nil
			})
		}()
		<-started

		prefix := b.ks.Prefix()
		b.rdb.Set(ctx, prefix+"foreign", "hello", time.Hour)
		b.rdb.HSet(ctx, prefix+"hash", "f", "v")

		out := b.ok(t, "scan", "--json", prefix)
		rows := map[string]scanRow{}
		for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
			var r scanRow
			if err := json.Unmarshal([]byte(line), &r); err != nil {
				t.Fatalf("scan --json line %q: %v", line, err)
			}
			rows[r.Key] = r
		}
		want := map[string]string{
			b.ks.Key("t", "1"): "value", b.ks.Key("t", "2"): "value", b.ks.Key("t", "404"): "tombstone",
			b.ks.Key("t", "slow"): "lease", ns.Key("page", "1"): "value", ns.String() + ":#gen": "generation",
			prefix + "foreign": "foreign", prefix + "hash": "foreign",
		}
		if len(rows) != len(want) {
			t.Errorf("scan listed %d keys, want %d:\n%s", len(rows), len(want), out)
		}
		for k, kind := range want {
			r, ok := rows[k]
			if !ok || r.Kind != kind {
				t.Errorf("%s: %+v, want kind %s", k, r, kind)
				continue
			}
			if r.Type == "" {
				if size := b.rdb.StrLen(ctx, k).Val(); r.Size != size {
					t.Errorf("%s: size %d, want STRLEN %d", k, r.Size, size)
				}
			}
			if r.Type == "" && (r.PTTLMillis <= 0 || r.PTTLMillis > int64(time.Hour/time.Millisecond)) {
				t.Errorf("%s: pttl %dms", k, r.PTTLMillis)
			}
		}
		if r := rows[prefix+"hash"]; r.Type != "hash" || r.Size != -1 || r.PTTLMillis != -1 {
			t.Errorf("hash: %+v, want type hash, size -1, no expiry", r)
		}
		if r := rows[b.ks.Key("t", "1")]; r.Codec != "json" {
			t.Errorf("codec %q, want json", r.Codec)
		}

		text := b.ok(t, "scan", prefix)
		mustContain(t, text, "KEY", "KIND", "SIZE", "TTL", "foreign (hash)", "8 keys: 3 value, 1 tombstone, 1 lease, 1 generation, 2 foreign\n")
		if strings.Contains(text, outside) {
			t.Errorf("scan %s listed %s", prefix, outside)
		}

		// The prefix is literal: glob characters in it match only themselves.
		b.rdb.Set(ctx, prefix+"star*", "x", time.Hour)
		b.rdb.Set(ctx, prefix+"starX", "x", time.Hour)
		mustContain(t, b.ok(t, "scan", prefix+"star*"), "1 key: 1 foreign\n")
		mustContain(t, b.ok(t, "scan", b.ks.Prefix()+"nothing"), "0 keys\n")
	})
}

func mustGet[T any](t *testing.T, c *cacheaside.Cache[T], key string, l cacheaside.Loader[T]) T {
	t.Helper()
	v, err := c.Get(ctx, key, l)
	if err != nil {
		t.Fatalf("Get %s: %v", key, err)
	}
	return v
}
