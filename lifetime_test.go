package cacheaside

import (
	"context"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestLifetimeFromTheValue: Options.Lifetime sets each entry's TTL from its
// value, or a "not found"'s, and the load's duration, within the Policy's
// TTL and NegativeTTL, for Get, GetMany and Set; the load's duration is
// passed in.
func TestLifetimeFromTheValue(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		rdb := b.client(t)
		var mu sync.Mutex
		took := map[string]time.Duration{}
		c, err := New[string](rdb, &Options[string]{
			Policy: Policy{TTL: time.Hour, NegativeTTL: time.Minute, Jitter: 0.1},
			Lifetime: func(v string, notFound bool, d time.Duration) time.Duration {
				mu.Lock()
				took[v] = d
				mu.Unlock()
				switch {
				case notFound:
					return 5 * time.Second
				case strings.HasPrefix(v, "short"):
					return 2 * time.Second
				case strings.HasPrefix(v, "long"):
					return 48 * time.Hour // above the Policy's TTL: the TTL
				}
				return 0 // the Policy's TTL
			},
		})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		pttl := func(k string) time.Duration {
			t.Helper()
			d, err := rdb.PTTL(ctx, k).Result()
			if err != nil {
				t.Fatal(err)
			}
			return d
		}
		within := func(what, k string, lo, hi time.Duration) {
			t.Helper()
			if d := pttl(k); d <= lo || d > hi {
				t.Errorf("%s: PTTL %v, want in (%v, %v]", what, d, lo, hi)
			}
		}
		load := func(v string, d time.Duration) func(context.Context) (string, error) {
			return func(context.Context) (string, error) {
				time.Sleep(d)
				if v == "" {
					return "", ErrNotFound
				}
				return v, nil
			}
		}
		if _, err := c.Get(ctx, b.key("short"), load("short", 20*time.Millisecond)); err != nil {
			t.Fatal(err)
		}
		within("a value whose Lifetime is 2s", b.key("short"), time.Second, 2*time.Second)
		mu.Lock()
		if took["short"] < 20*time.Millisecond {
			t.Errorf("Lifetime was told the load took %v; it slept 20ms", took["short"])
		}
		mu.Unlock()
		if _, err := c.Get(ctx, b.key("long"), load("long", 0)); err != nil {
			t.Fatal(err)
		}
		within("a value whose Lifetime is above the Policy's TTL", b.key("long"), 50*time.Minute, time.Hour)
		if _, err := c.Get(ctx, b.key("plain"), load("plain", 0)); err != nil {
			t.Fatal(err)
		}
		within("a value whose Lifetime is 0", b.key("plain"), 50*time.Minute, time.Hour)
		if _, err := c.Get(ctx, b.key("gone"), load("", 0)); err != ErrNotFound {
			t.Fatalf("Get of a missing item: %v", err)
		}
		within("a not-found whose Lifetime is 5s", b.key("gone"), 4*time.Second, 5*time.Second)

		keys := []string{b.key("many-short"), b.key("many-long")}
		if _, err := GetMany(ctx, c, []int{0, 1}, func(i int) string { return keys[i] }, func(_ context.Context, ids []int) (map[int]string, error) {
			return map[int]string{0: "short-many", 1: "long-many"}, nil
		}); err != nil {
			t.Fatal(err)
		}
		within("GetMany: a 2s value", keys[0], time.Second, 2*time.Second)
		within("GetMany: a value above the TTL", keys[1], 50*time.Minute, time.Hour)

		if err := c.Set(ctx, b.key("set"), "short-set"); err != nil {
			t.Fatal(err)
		}
		within("Set: a 2s value", b.key("set"), time.Second, 2*time.Second)
		mu.Lock()
		if d := took["short-set"]; d != 0 {
			t.Errorf("Lifetime was told Set's value took %v to load; want 0", d)
		}
		mu.Unlock()
	})
}

// TestLifetimeOfARefresh: a stale-while-revalidate refresh fills with the
// lifetime Options.Lifetime gives the new value.
func TestLifetimeOfARefresh(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		rdb := b.client(t)
		c, err := New[string](rdb, &Options[string]{
			Policy: Policy{TTL: time.Hour, StaleWhileRevalidate: 10 * time.Second, NoJitter: true},
			Lifetime: func(v string, _ bool, _ time.Duration) time.Duration {
				if v == "first" {
					return 500 * time.Millisecond
				}
				return 2 * time.Second
			},
		})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		key := b.key("r")
		if _, err := c.Get(ctx, key, func(context.Context) (string, error) { return "first", nil }); err != nil {
			t.Fatal(err)
		}
		time.Sleep(600 * time.Millisecond) // past its 500ms: stale, inside the window
		second := func(context.Context) (string, error) { return "second", nil }
		waitFor(t, "the refreshed value", func() bool {
			v, err := c.Get(ctx, key, second)
			return err == nil && v == "second"
		})
		if d, err := rdb.PTTL(ctx, key).Result(); err != nil || d <= 11*time.Second || d > 12*time.Second {
			t.Fatalf("after the refresh: PTTL %v, %v; want the refreshed value's 2s plus the 10s stale window", d, err)
		}
	})
}
