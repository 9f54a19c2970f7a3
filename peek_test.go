package cacheaside

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/seed-b4ec662f/cacheaside/internal/envelope"
)

// noLoad is a loader for Gets that must not load.
func noLoad(context.Context) (string, error) { return "", errors.New("no load expected") }

// Peek reports each state a key can be in, without loading or writing.
func TestPeek(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		clock := newFakeClock()
		c := newCache(t, b, &Options[string]{Clock: clock.Now, Policy: Policy{TTL: time.Minute, NegativeTTL: 30 * time.Second,
			StaleWhileRevalidate: time.Minute, StaleIfError: time.Hour, NoJitter: true, NoEarlyRefresh: true}})
		raw := b.client(t)
		key := b.key("peek")
		state := func(want string) Peeked[string] {
			t.Helper()
			p, err := c.Peek(ctx, key)
			if err != nil || p.State != want {
				t.Fatalf("Peek = %+v, %v; want state %q", p, err, want)
			}
			return p
		}
		state("absent")
		if n := raw.Exists(ctx, key).Val(); n != 0 {
			t.Fatal("Peek wrote the key")
		}
		loads := 0
		load := func(context.Context) (string, error) {
			loads++
			clock.Advance(20 * time.Millisecond) // the load takes 20 ms by the cache's clock
			return "v", nil
		}
		mustGet(t, c, key, load, "v")
		p := state("fresh")
		if p.Value != "v" || p.Refreshing || p.LoadTime != 20*time.Millisecond || !p.Expires.Equal(clock.Now().Add(time.Minute).Truncate(time.Millisecond)) {
			t.Fatalf("fresh: %+v (now %v)", p, clock.Now())
		}
		if written := clock.Now().Truncate(time.Millisecond); !p.Written.Equal(written) || p.Age != 0 {
			t.Fatalf("fresh: written %v, age %v; want %v, 0", p.Written, p.Age, written)
		}
		clock.Advance(90 * time.Second)
		if p := state("stale"); p.Value != "v" || p.Age != 90*time.Second {
			t.Fatalf("stale: %+v; want age 1m30s", p)
		}
		clock.Advance(time.Minute)
		if p := state("expired"); p.Value != "v" {
			t.Fatalf("expired: %+v", p)
		}
		if loads != 1 {
			t.Fatalf("%d loads; Peek must not load", loads)
		}
		if s := c.Stats(); s.Hits != 0 || s.Misses != 1 {
			t.Fatalf("Peek was counted: %+v", s)
		}

		gone := b.key("peek-gone")
		if _, err := c.Get(ctx, gone, func(context.Context) (string, error) { return "", ErrNotFound }); !errors.Is(err, ErrNotFound) {
			t.Fatal(err)
		}
		if p, err := c.Peek(ctx, gone); err != nil || p.State != "not-found" || p.Expires.IsZero() {
			t.Fatalf("Peek of a cached not-found = %+v, %v", p, err)
		}

		leased := b.key("peek-lease")
		if held, _, err := acquire(ctx, raw, leased, newToken(), time.Minute); err != nil || !held {
			t.Fatal(held, err)
		}
		if p, err := c.Peek(ctx, leased); err != nil || p.State != "loading" {
			t.Fatalf("Peek of a lease = %+v, %v", p, err)
		}
		junk := b.key("peek-junk")
		raw.Set(ctx, junk, "not an entry", time.Minute)
		if p, err := c.Peek(ctx, junk); err != nil || p.State != "undecodable" {
			t.Fatalf("Peek of foreign bytes = %+v, %v", p, err)
		}
		list := b.key("peek-list")
		raw.RPush(ctx, list, "x")
		if p, err := c.Peek(ctx, list); err != nil || p.State != "undecodable" {
			t.Fatalf("Peek of a list = %+v, %v", p, err)
		}
		if _, err := c.Peek(ctx, ""); !errors.Is(err, ErrInvalidKey) {
			t.Fatalf("Peek of an empty key: %v", err)
		}
	})
}

// In a namespace, Peek sees what a Get would: nothing after a bump.
func TestPeekNamespace(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		c := newCache(t, b, &Options[string]{Namespaced: true})
		ns := MustKeyspace("peekns", 1).Namespace(b.prefix, "a")
		key := ns.Key("k")
		mustGet(t, c, key, func(context.Context) (string, error) { return "v", nil }, "v")
		if p, err := c.Peek(ctx, key); err != nil || p.State != "fresh" || p.Value != "v" {
			t.Fatalf("Peek = %+v, %v", p, err)
		}
		if err := c.InvalidateNamespace(ctx, ns); err != nil {
			t.Fatal(err)
		}
		if p, err := c.Peek(ctx, key); err != nil || p.State != "absent" {
			t.Fatalf("Peek after the bump = %+v, %v", p, err)
		}
	})
}

// SetMany writes in rounds, leaves keys under a lease to their holders,
// overwrites values, and refuses invalid keys without losing the others.
func TestSetMany(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		c := newCache(t, b, &Options[string]{})
		raw := b.client(t)
		const n = 600 // three rounds
		vals := make(map[string]string, n+1)
		for i := range n {
			vals[b.key("warm:")+strconv.Itoa(i)] = "w" + strconv.Itoa(i)
		}
		leased := b.key("warm:7")
		tok := newToken()
		if held, _, err := acquire(ctx, raw, leased, tok, time.Minute); err != nil || !held {
			t.Fatal(held, err)
		}
		old := b.key("warm:8")
		mustGet(t, c, old, func(context.Context) (string, error) { return "old", nil }, "old")
		// Another process is reloading warm:9 under a live refresh lease.
		refreshing := b.key("warm:9")
		mustGet(t, c, refreshing, func(context.Context) (string, error) { return "r", nil }, "r")
		bs, err := raw.Get(ctx, refreshing).Bytes()
		if err != nil {
			t.Fatal(err)
		}
		var e envelope.Entry
		if err := envelope.Decode(bs, &e); err != nil {
			t.Fatal(err)
		}
		if n, err := c.leases.refresh(refreshing, "", e.Token, newToken(), false).on(ctx, raw).Int64(); n != 1 || err != nil {
			t.Fatal(n, err)
		}
		vals[""] = "bad key"

		wrote, err := c.SetMany(ctx, vals)
		var ke *KeyError
		if wrote != n-2 || !errors.As(err, &ke) || ke.Key != "" || !errors.Is(err, ErrInvalidKey) {
			t.Fatalf("SetMany = %d, %v; want %d written and the empty key refused", wrote, err, n-2)
		}
		if p, err := c.Peek(ctx, leased); err != nil || p.State != "loading" {
			t.Fatalf("the leased key after SetMany: %+v, %v; want the lease left alone", p, err)
		}
		if p, err := c.Peek(ctx, refreshing); err != nil || p.State != "fresh" || !p.Refreshing || p.Value != "r" {
			t.Fatalf("the key being refreshed after SetMany: %+v, %v; want its refresh left alone", p, err)
		}
		loads := 0
		for k, v := range vals {
			if k == "" || k == leased || k == refreshing {
				continue
			}
			mustGet(t, c, k, func(context.Context) (string, error) { loads++; return "loaded", nil }, v)
		}
		if loads != 0 {
			t.Fatalf("%d loads after SetMany", loads)
		}
		if s := c.Stats(); s.Hits != uint64(n-2) {
			t.Fatalf("%d hits, want %d", s.Hits, n-2)
		}
		// A retry of the same write (same tokens) would report written; a
		// second SetMany writes again with new tokens.
		if wrote, err := c.SetMany(ctx, map[string]string{old: "newer"}); wrote != 1 || err != nil {
			t.Fatalf("SetMany over a value = %d, %v", wrote, err)
		}
		mustGet(t, c, old, noLoad, "newer")
	})
}

// SetMany in a namespace stamps the current generation.
func TestSetManyNamespace(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		c := newCache(t, b, &Options[string]{Namespaced: true})
		ns := MustKeyspace("warmns", 1).Namespace(b.prefix, "a")
		vals := map[string]string{}
		for i := range 5 {
			vals[ns.Key(strconv.Itoa(i))] = fmt.Sprint(i)
		}
		if wrote, err := c.SetMany(ctx, vals); wrote != 5 || err != nil {
			t.Fatalf("SetMany = %d, %v", wrote, err)
		}
		for k, v := range vals {
			mustGet(t, c, k, noLoad, v)
		}
		if err := c.InvalidateNamespace(ctx, ns); err != nil {
			t.Fatal(err)
		}
		for k := range vals {
			if p, err := c.Peek(ctx, k); err != nil || p.State != "absent" {
				t.Fatalf("after the bump: %+v, %v", p, err)
			}
		}
		if wrote, err := c.SetMany(ctx, vals); wrote != 5 || err != nil {
			t.Fatalf("SetMany after the bump = %d, %v", wrote, err)
		}
		for k, v := range vals {
			mustGet(t, c, k, noLoad, v)
		}
	})
}

// SetMany drops the local tiers' copies of what it wrote, in this process
// and others.
func TestSetManyLocalTiers(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		c1 := localCache(t, b, &Options[string]{Local: &LocalOptions{TTL: time.Hour}})
		c2 := localCache(t, b, &Options[string]{Local: &LocalOptions{TTL: time.Hour}})
		key := b.key("warm-local")
		mustGet(t, c1, key, func(context.Context) (string, error) { return "v0", nil }, "v0")
		mustGet(t, c2, key, noLoad, "v0")
		mustGet(t, c2, key, noLoad, "v0") // from c2's local tier now
		if _, err := c1.SetMany(ctx, map[string]string{key: "v1"}); err != nil {
			t.Fatal(err)
		}
		mustGet(t, c1, key, noLoad, "v1")
		waitFor(t, "the other process's local tier to drop its copy", func() bool {
			v, err := c2.Get(ctx, key, func(context.Context) (string, error) { return "", errors.New("no load expected") })
			return err == nil && v == "v1"
		})
	})
}

// With Redis down, SetMany returns each key's error and queues its
// invalidation, so no older value outlives the call; with the recommended
// client settings and with go-redis's defaults.
func TestSetManyRedisDown(t *testing.T) {
	for name, opt := range map[string]*redis.Options{
		"recommended":       Recommended(&redis.Options{Addr: closedAddr(t)}),
		"go-redis defaults": {Addr: closedAddr(t)},
	} {
		t.Run(name, func(t *testing.T) {
			rdb := redis.NewClient(opt)
			t.Cleanup(func() { _ = rdb.Close() })
			c, err := New[string](rdb, &Options[string]{Logger: slog.New(slog.DiscardHandler)})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = c.Close() })
			wrote, err := c.SetMany(context.Background(), map[string]string{"a": "1", "b": "2"})
			var ke *KeyError
			if wrote != 0 || !errors.As(err, &ke) {
				t.Fatalf("SetMany with Redis down = %d, %v", wrote, err)
			}
			for _, k := range []string{"a", "b"} {
				if !c.retries.covers(k, verKeys{}) {
					t.Fatalf("key %s: no invalidation queued", k)
				}
			}
		})
	}
}
