package cacheaside

import (
	"context"
	"errors"
	"fmt"
	"github.com/seed-b4ec662f/cacheaside/internal/wire"
	"sync/atomic"
	"testing"
	"time"
)

func TestInvalidatePrefix(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		c := newCache[string](t, b, nil)
		ks := MustKeyspace("tasks", 1)
		var n counter
		var acme, others []string
		for i := 0; i < 2500; i++ { // more than one SCAN batch
			acme = append(acme, b.key(ks.Key("org", "acme", "page", fmt.Sprint(i))))
		}
		for _, org := range []string{"acme2", "acm", "other"} {
			others = append(others, b.key(ks.Key("org", org, "page", "1")))
		}
		for _, k := range append(append([]string{}, acme...), others...) {
			if err := c.Set(ctx, k, "v"); err != nil {
				t.Fatal(err)
			}
		}
		got, err := c.InvalidatePrefix(ctx, b.key(ks.Prefix("org", "acme")))
		if err != nil || got != int64(len(acme)) {
			t.Fatalf("InvalidatePrefix = %d, %v; want %d", got, err, len(acme))
		}
		for _, k := range acme[:10] {
			if b.raw(t, k) != nil {
				t.Fatalf("%s survived", k)
			}
		}
		for _, k := range others {
			if v, _ := c.Get(ctx, k, n.load("loaded", 0)); v != "v" {
				t.Fatalf("%s was invalidated too", k)
			}
		}
		if s := c.Stats(); s.Invalidations != uint64(len(acme)) {
			t.Fatalf("Invalidations = %d", s.Invalidations)
		}
		if _, err := c.InvalidatePrefix(ctx, ""); !errors.Is(err, ErrInvalidKey) {
			t.Fatalf("empty prefix: %v", err)
		}
		cctx, cancel := context.WithCancel(ctx)
		cancel()
		if _, err := c.InvalidatePrefix(cctx, b.key("x")); !errors.Is(err, context.Canceled) {
			t.Fatalf("cancelled ctx: %v", err)
		}
	})
}

// TestInvalidatePrefixLiteral: org names full of glob and separator
// characters never widen an invalidation.
func TestInvalidatePrefixLiteral(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		c := newCache[string](t, b, nil)
		ks := MustKeyspace("tasks", 1)
		orgs := []string{"acme", "acme2", "ac*", "a?me", "[a]cme", "[!a]cme", "acme:status", "acme\\", "*", "?", "[", ":", "", "Acme"}
		for _, victim := range orgs {
			for _, org := range orgs {
				if err := c.Set(ctx, b.key(ks.Key("org", org, "status", "done")), org); err != nil {
					t.Fatal(err)
				}
			}
			n, err := c.InvalidatePrefix(ctx, b.key(ks.Prefix("org", victim)))
			if err != nil || n != 1 {
				t.Fatalf("InvalidatePrefix(org %q) deleted %d keys (%v), want exactly its own", victim, n, err)
			}
			if b.raw(t, b.key(ks.Key("org", victim, "status", "done"))) != nil {
				t.Fatalf("org %q not invalidated", victim)
			}
		}
		// A raw prefix with glob characters is taken literally too.
		if err := c.Set(ctx, b.key("lit*x"), "a"); err != nil {
			t.Fatal(err)
		}
		if err := c.Set(ctx, b.key("litZZx"), "b"); err != nil {
			t.Fatal(err)
		}
		if n, _ := c.InvalidatePrefix(ctx, b.key("lit*")); n != 1 {
			t.Fatalf("prefix with * deleted %d keys, want 1", n)
		}
	})
}

// TestInvalidatePrefixRevokesInFlightFill: a load that started before the
// prefix invalidation cannot fill afterwards.
func TestInvalidatePrefixRevokesInFlightFill(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		c := newCache[int64](t, b, nil)
		key := b.key("org:a:1")
		var db atomic.Int64
		db.Store(1)
		inLoad, resume := make(chan struct{}), make(chan struct{})
		done := make(chan struct{})
		go func() {
			defer close(done)
			_, _ = c.Get(ctx, key, func(context.Context) (int64, error) {
				v := db.Load()
				close(inLoad)
				<-resume
				return v, nil
			})
		}()
		<-inLoad
		db.Store(2)
		if n, err := c.InvalidatePrefix(ctx, b.key("org:a:")); err != nil || n != 1 {
			t.Fatalf("InvalidatePrefix = %d, %v; want the lease deleted", n, err)
		}
		close(resume)
		<-done
		if v, _ := c.Get(ctx, key, func(context.Context) (int64, error) { return db.Load(), nil }); v != 2 {
			t.Fatalf("Get after InvalidatePrefix = %d, want 2", v)
		}
	})
}

func TestNamespace(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		lists := newCache(t, b, &Options[string]{Namespaced: true})
		ks := MustKeyspace("task_lists", 1)
		acme := ks.Namespace(b.prefix+"org", "acme")
		other := ks.Namespace(b.prefix+"org", "other")
		var n counter
		pages := []string{acme.Key("page", "1"), acme.Key("page", "2"), other.Key("page", "1")}
		for _, k := range pages {
			if v, err := lists.Get(ctx, k, n.load("v1", 0)); err != nil || v != "v1" {
				t.Fatalf("Get(%s) = %q, %v", k, v, err)
			}
		}
		for _, k := range pages {
			if v, _ := lists.Get(ctx, k, n.load("nope", 0)); v != "v1" {
				t.Fatalf("not a hit: %s", k)
			}
		}
		if n.calls.Load() != 3 {
			t.Fatalf("loads = %d, want 3", n.calls.Load())
		}
		if err := lists.InvalidateNamespace(ctx, acme); err != nil {
			t.Fatal(err)
		}
		for _, k := range pages[:2] {
			if v, _ := lists.Get(ctx, k, n.load("v2", 0)); v != "v2" {
				t.Fatalf("after bump, %s = %q, want v2", k, v)
			}
		}
		if v, _ := lists.Get(ctx, pages[2], n.load("v2", 0)); v != "v1" {
			t.Fatalf("bump of acme reached other: %q", v)
		}
		if s := lists.Stats(); s.NamespaceBumps != 1 {
			t.Fatalf("NamespaceBumps = %d", s.NamespaceBumps)
		}
		// Set writes within the current generation.
		if err := lists.Set(ctx, pages[0], "set"); err != nil {
			t.Fatal(err)
		}
		if v, _ := lists.Get(ctx, pages[0], n.load("x", 0)); v != "set" {
			t.Fatalf("after Set: %q", v)
		}
		// The generation key lost (evicted, expired): entries read as misses.
		if err := b.client(t).Del(ctx, acme.genKey()).Err(); err != nil {
			t.Fatal(err)
		}
		if v, _ := lists.Get(ctx, pages[0], n.load("v3", 0)); v != "v3" {
			t.Fatalf("after the generation key vanished: %q, want v3", v)
		}
		// Keys must carry a namespace; namespaces need a namespaced cache.
		if _, err := lists.Get(ctx, ks.Key("page", "1"), n.load("x", 0)); !errors.Is(err, ErrInvalidKey) {
			t.Fatalf("key without namespace: %v", err)
		}
		plain := newCache[string](t, b, nil)
		if err := plain.InvalidateNamespace(ctx, acme); !errors.Is(err, ErrInvalidOptions) {
			t.Fatalf("InvalidateNamespace on a plain cache: %v", err)
		}
		// A prefix invalidation covers a namespace too.
		if n, err := lists.InvalidatePrefix(ctx, other.Prefix()); err != nil || n < 1 {
			t.Fatalf("InvalidatePrefix(namespace) = %d, %v", n, err)
		}
	})
}

// TestNamespaceBumpRevokesInFlightFill: a bump during a load makes its fill
// fail, and a Get after the bump does not join the old load.
func TestNamespaceBumpRevokesInFlightFill(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		lists := newCache(t, b, &Options[int64]{Namespaced: true})
		ns := MustKeyspace("task_lists", 1).Namespace(b.prefix+"org", "acme")
		key := ns.Key("page", "1")
		var db atomic.Int64
		db.Store(1)
		inLoad, resume := make(chan struct{}), make(chan struct{})
		var first atomic.Bool
		load := func(context.Context) (int64, error) {
			v := db.Load()
			if first.CompareAndSwap(false, true) {
				close(inLoad)
				<-resume
			}
			return v, nil
		}
		done := make(chan struct{})
		go func() { defer close(done); _, _ = lists.Get(ctx, key, load) }()
		<-inLoad
		db.Store(2)
		if err := lists.InvalidateNamespace(ctx, ns); err != nil {
			t.Fatal(err)
		}
		got := make(chan int64, 1)
		go func() { v, _ := lists.Get(ctx, key, load); got <- v }()
		select {
		case v := <-got:
			if v != 2 {
				t.Fatalf("Get after bump = %d, want 2", v)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("Get after the bump waited for the old load")
		}
		close(resume)
		<-done
		if v, _ := lists.Get(ctx, key, load); v != 2 {
			t.Fatalf("cache holds %d after the old load ended, want 2", v)
		}
	})
}

func TestNamespaceKeys(t *testing.T) {
	ks := MustKeyspace("task_lists", 1)
	ns := ks.Namespace("org", "ac{me}:*")
	if got, want := ns.String(), "v1:task_lists:{org:ac%7Bme%7D%3A%2A}"; got != want {
		t.Fatalf("Namespace = %q, want %q", got, want)
	}
	if got, want := ns.Key("page", "2"), "v1:task_lists:{org:ac%7Bme%7D%3A%2A}:page:2"; got != want {
		t.Fatalf("Key = %q, want %q", got, want)
	}
	if g, ok := wire.GenerationKey(ns.Key("page", "2")); !ok || g != ns.genKey() {
		t.Fatalf("namespaceGenKey = %q, %v", g, ok)
	}
	if g, ok := wire.GenerationKey(ns.Key()); !ok || g != ns.genKey() {
		t.Fatalf("wire.GenerationKey(tag only) = %q, %v", g, ok)
	}
	for _, bad := range []string{"v1:x:1", "v1:x:{}", "v1:x:{a}b", "v1:x:{a"} {
		if _, ok := wire.GenerationKey(bad); ok {
			t.Errorf("wire.GenerationKey(%q) accepted", bad)
		}
	}
	if ns.Key("#gen") == ns.genKey() {
		t.Fatal("a part forged the generation key")
	}
}
