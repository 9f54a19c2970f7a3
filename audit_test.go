package cacheaside

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/seed-b4ec662f/cacheaside/internal/wire"
)

// TestAudit: 30 cached tasks, of which the source then changes 5 without
// an invalidation (the write the application forgot) and deletes 2, and a
// "not found" cached for an id the source then creates. The audit samples
// every entry and finds exactly those 8 stale, with their keys; entries
// inside a stale window, leases and a namespace generation key are
// skipped; after invalidating the stale keys, the audit finds none.
func TestAudit(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		var skew atomic.Int64 // miniredis's time moves by FastForward, the cache's with it
		c := newCache(t, b, &Options[string]{Policy: Policy{TTL: time.Hour, NoJitter: true},
			Clock: func() time.Time { return time.Now().Add(time.Duration(skew.Load())) }})
		ks := b.prefix + "task:"
		var mu sync.Mutex
		db := map[string]string{}
		for i := range 30 {
			db[fmt.Sprint(ks, i)] = fmt.Sprint("title ", i)
		}
		source := func(_ context.Context, key string) (string, error) {
			mu.Lock()
			defer mu.Unlock()
			v, ok := db[key]
			if !ok {
				return "", ErrNotFound
			}
			return v, nil
		}
		get := func(key string) {
			if _, err := c.Get(ctx, key, func(ctx context.Context) (string, error) { return source(ctx, key) }); err != nil && err != ErrNotFound {
				t.Fatal(err)
			}
		}
		for i := range 31 {
			get(fmt.Sprint(ks, i)) // 30 values, and "not found" for id 30
		}
		clean, err := c.Audit(ctx, ks, 1000, source)
		if err != nil {
			t.Fatal(err)
		}
		if clean.Sampled != 31 || clean.Stale != 0 || clean.Skipped != 0 {
			t.Fatalf("before any write: %+v; want 31 sampled, none stale", clean)
		}

		// A lease (a load in flight elsewhere) and a foreign key under the prefix.
		if held, _, err := acquire(ctx, b.client(t), ks+"loading", newToken(), time.Minute); err != nil || !held {
			t.Fatal(held, err)
		}
		mu.Lock()
		want := map[string]bool{}
		for _, i := range []int{1, 5, 9, 13, 17} {
			k := fmt.Sprint(ks, i)
			db[k] += " (edited)"
			want[k] = true
		}
		for _, i := range []int{20, 21} {
			k := fmt.Sprint(ks, i)
			delete(db, k)
			want[k] = true
		}
		db[fmt.Sprint(ks, 30)] = "created"
		want[fmt.Sprint(ks, 30)] = true
		mu.Unlock()
		b.advance(2 * time.Second)
		if b.mr != nil {
			skew.Add(int64(2 * time.Second))
		}

		rep, err := c.Audit(ctx, ks, 1000, source)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("%+v", rep)
		if rep.Sampled != 31 || rep.Stale != len(want) || rep.Skipped != 1 || len(rep.StaleKeys) != len(want) {
			t.Fatalf("audit %+v; want 31 sampled, %d stale, 1 skipped (the lease)", rep, len(want))
		}
		for _, k := range rep.StaleKeys {
			if !want[k] {
				t.Errorf("%s reported stale; it is not", k)
			}
		}
		if rep.OldestStale < time.Second {
			t.Errorf("oldest stale entry %v old; want at least the 2s since its load", rep.OldestStale)
		}

		// A bounded sample: n caps it.
		if r, err := c.Audit(ctx, ks, 10, source); err != nil || r.Sampled+r.Skipped > 10 {
			t.Fatalf("audit of 10: %+v, %v", r, err)
		}

		if _, err := c.Invalidate(ctx, rep.StaleKeys...); err != nil {
			t.Fatal(err)
		}
		after, err := c.Audit(ctx, ks, 1000, source)
		if err != nil {
			t.Fatal(err)
		}
		if after.Stale != 0 || after.Sampled != 31-len(want) {
			t.Fatalf("after invalidating the stale keys: %+v; want %d sampled, none stale", after, 31-len(want))
		}

		// Bad input.
		for _, tc := range []struct {
			prefix string
			n      int
			load   func(context.Context, string) (string, error)
		}{{"", 1, source}, {ks, 0, source}, {ks, 1, nil}} {
			if _, err := c.Audit(ctx, tc.prefix, tc.n, tc.load); err == nil || !strings.Contains(err.Error(), "Audit") {
				t.Errorf("Audit(%q, %d) = %v; want ErrInvalidOptions", tc.prefix, tc.n, err)
			}
		}
	})
}

// TestClusterAudit: on the 3-master cluster, the audit samples the entries
// of every master (its SCAN walks each) and finds the stale ones among
// them.
func TestClusterAudit(t *testing.T) {
	cc := clusterClient(t, clusterAddrs(t))
	c := clusterCache[string](t, cc, nil)
	ctx := context.Background()
	p := uniquePrefix() + "task:"
	db := map[string]string{}
	for i := range 60 {
		k := fmt.Sprint(p, i)
		db[k] = "v"
		if _, err := c.Get(ctx, k, func(context.Context) (string, error) { return "v", nil }); err != nil {
			t.Fatal(err)
		}
	}
	onEveryMaster(t, "the entries", keysPerMaster(t, cc, wire.EscapeGlob(p)+"*"))
	stale := map[string]bool{}
	for i := 0; i < 60; i += 7 {
		k := fmt.Sprint(p, i)
		db[k] = "changed"
		stale[k] = true
	}
	rep, err := c.Audit(ctx, p, 1000, func(_ context.Context, key string) (string, error) { return db[key], nil })
	if err != nil {
		t.Fatal(err)
	}
	if rep.Sampled != 60 || rep.Stale != len(stale) {
		t.Fatalf("audit %+v; want 60 sampled and %d stale", rep, len(stale))
	}
	for _, k := range rep.StaleKeys {
		if !stale[k] {
			t.Errorf("%s reported stale", k)
		}
	}
}
