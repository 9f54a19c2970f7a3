package main

import (
	"encoding/json"
	"github.com/seed-b4ec662f/cacheaside/internal/wire"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/seed-b4ec662f/cacheaside"
)

func TestInvalidateKeysAndPrefix(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		c := newCache[string](t, b, nil)
		var n atomic.Int64
		for _, k := range []string{"1", "2", "3"} {
			mustGet(t, c, b.ks.Key("k", k), load("v"+k, &n))
		}
		out := b.ok(t, "invalidate", "--cache", b.cacheName, "key", b.ks.Key("k", "1"), b.ks.Key("k", "2"), b.ks.Key("k", "missing"))
		mustContain(t, out, "deleted 2 of 3 keys\n", "published on cacheaside:invalidate:"+b.cacheName+" to 0 subscribers\n")
		if got := b.exist(b.ks.Key("k", "1"), b.ks.Key("k", "2"), b.ks.Key("k", "3")); got != 1 {
			t.Errorf("%d of the keys exist, want 1", got)
		}

		for _, org := range []string{"acme", "acme2"} {
			for _, p := range []string{"1", "2"} {
				mustGet(t, c, b.ks.Key("org", org, "page", p), load("page", &n))
			}
		}
		var res invalidateResult
		out = b.ok(t, "invalidate", "--json", "--cache", b.cacheName, "prefix", b.ks.Prefix("org", "acme"))
		if err := json.Unmarshal([]byte(out), &res); err != nil {
			t.Fatalf("%v: %s", err, out)
		}
		if res.Op != "prefix" || res.Deleted == nil || *res.Deleted != 2 || res.Channel != "cacheaside:invalidate:"+b.cacheName {
			t.Errorf("invalidate prefix --json: %s", out)
		}
		if got := b.exist(b.ks.Key("org", "acme2", "page", "1"), b.ks.Key("org", "acme2", "page", "2")); got != 2 {
			t.Errorf("acme2's keys: %d left, want 2 (its prefix differs)", got)
		}
		// Without --cache the message goes to the default name's channel,
		// where nobody listens: the command says so.
		r := b.cli(t, "invalidate", "prefix", b.ks.Prefix("org", "acme"))
		mustContain(t, r.stdout, "deleted 0 keys under", "published on cacheaside:invalidate:default to 0 subscribers\n")
		if r.code != exitOK || !strings.Contains(r.stderr, "warning: no process subscribes to cacheaside:invalidate:default") || !strings.Contains(r.stderr, "--cache") {
			t.Errorf("invalidate without --cache: exit %d, stderr %q; want exit 0 and a warning naming --cache", r.code, r.stderr)
		}
		if res.Subscribers == nil || *res.Subscribers != 0 {
			t.Errorf("--json subscribers: %s", out)
		}
	})
}

func TestInvalidateNamespace(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		c := newCache(t, b, &cacheaside.Options[string]{Namespaced: true})
		ns := b.ks.Namespace("org", "acme")
		key := ns.Key("page", "1")
		var loads atomic.Int64
		mustGet(t, c, key, load("p1", &loads))

		before := b.inspectJSON(t, key)
		if before.Namespace == nil || before.Namespace.Namespace != ns.String() || before.Namespace.GenKey != ns.String()+":#gen" ||
			before.Namespace.Current == nil || !*before.Namespace.Current || *before.Namespace.EntryGen != *before.Namespace.CurrentGen {
			t.Fatalf("before the bump: %+v", before.Namespace)
		}
		mustContain(t, b.ok(t, "inspect", key), "namespace    "+ns.String()+"\n", "generation   "+*before.Namespace.EntryGen+" (current: true)\n")

		var res invalidateResult
		out := b.ok(t, "invalidate", "--json", "--cache", b.cacheName, "--ttl", "1h", "namespace", ns.String())
		if err := json.Unmarshal([]byte(out), &res); err != nil {
			t.Fatalf("%v: %s", err, out)
		}
		old := *before.Namespace.EntryGen
		if res.OldGeneration == nil || *res.OldGeneration != old || len(res.NewGeneration) != 16 || res.NewGeneration == old {
			t.Errorf("invalidate namespace: %s; want old generation %s and a new one", out, old)
		}
		// The generation key lives 2 × TTL + LeaseTTL, as the library sets it.
		if pttl := b.rdb.PTTL(ctx, res.GenerationKey).Val(); pttl < 2*time.Hour || pttl > 2*time.Hour+3*time.Second {
			t.Errorf("generation key TTL %v, want 2h3s", pttl)
		}

		after := b.inspectJSON(t, key)
		if after.Namespace.Current == nil || *after.Namespace.Current || *after.Namespace.EntryGen != old || *after.Namespace.CurrentGen != res.NewGeneration {
			t.Errorf("after the bump: %+v", after.Namespace)
		}
		mustContain(t, b.ok(t, "inspect", key), "generation   "+old+" (current: false; the namespace is at "+res.NewGeneration+")\n")
		gen := b.inspectJSON(t, res.GenerationKey)
		if gen.Kind != "generation" || gen.Generation != res.NewGeneration {
			t.Errorf("inspect of the generation key: %+v", gen)
		}

		// The library agrees: the entry is a miss now, and the reload is current.
		mustGet(t, c, key, load("p1 again", &loads))
		if loads.Load() != 2 {
			t.Errorf("%d loads, want 2: the bump must turn the entry into a miss", loads.Load())
		}
		if in := b.inspectJSON(t, key); !*in.Namespace.Current {
			t.Errorf("after the reload: %+v", in.Namespace)
		}

		// A second bump, in text; and a namespace whose generation key is gone.
		mustContain(t, b.ok(t, "invalidate", "--cache", b.cacheName, "namespace", ns.String()), "namespace "+ns.String()+": generation "+res.NewGeneration+" -> ")
		b.rdb.Del(ctx, res.GenerationKey)
		mustContain(t, b.ok(t, "inspect", key), " (current: false; the namespace has no generation now)\n")
		mustContain(t, b.ok(t, "invalidate", "--cache", b.cacheName, "namespace", ns.String()), "generation none -> ")
	})
}

// TestInvalidateTagsAndClear: invalidate tag reloads exactly the entries
// carrying the tag, and invalidate clear every entry of the cache.
func TestInvalidateTagsAndClear(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		c := newCache(t, b, &cacheaside.Options[string]{Clearable: true, Tags: func(key string) []string {
			return []string{"org:" + key[strings.LastIndex(key, ":")+1:]}
		}})
		keys := []string{b.ks.Key("page", "acme"), b.ks.Key("page", "globex")}
		var loads atomic.Int64
		for _, k := range keys {
			mustGet(t, c, k, load("p", &loads))
		}
		var res invalidateResult
		out := b.ok(t, "invalidate", "--json", "--cache", b.cacheName, "tag", "org:acme")
		if err := json.Unmarshal([]byte(out), &res); err != nil || res.Op != "tag" || len(res.Tags) != 1 || res.Tags[0] != "org:acme" {
			t.Fatalf("invalidate tag --json: %s (%v)", out, err)
		}
		tagKey := wire.TagKeyPrefix + wire.EscapePart(b.cacheName) + ":" + wire.EscapePart("org:acme")
		if in := b.inspectJSON(t, tagKey); in.Kind != "generation" || len(in.Generation) != 16 {
			t.Errorf("inspect of the tag's generation key: %+v", in)
		}
		for _, k := range keys {
			mustGet(t, c, k, load("p", &loads))
		}
		if n := loads.Load(); n != 3 {
			t.Fatalf("%d loads after invalidate tag org:acme, want 3 (acme's page reloaded, globex's not)", n)
		}
		mustContain(t, b.ok(t, "invalidate", "--cache", b.cacheName, "clear"), "cleared: every entry of the cache is a miss from now on\n")
		for _, k := range keys {
			mustGet(t, c, k, load("p", &loads))
		}
		if n := loads.Load(); n != 5 {
			t.Fatalf("%d loads after invalidate clear, want 5", n)
		}
		if r := b.cli(t, "invalidate", "tag"); r.code != exitUsage {
			t.Errorf("invalidate tag without a TAG: exit %d", r.code)
		}
	})
}

// TestInvalidateReachesLocalTier: a Cache with a local tier holds a value
// in memory; the command's invalidation reaches it through the bus, so its
// next Get calls the loader. First, as the control, the same command with
// another --cache: Redis changes, but the message goes to another channel,
// and the local tier goes on serving its copy.
func TestInvalidateReachesLocalTier(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ns := b.ks.Namespace("org", "acme")
		for _, tc := range []struct {
			name       string
			namespaced bool
			channel    string // LocalOptions.Channel; "" the default
			key        string
			args       []string // after --cache or --channel
		}{
			{"key", false, "", b.ks.Key("task", "1"), []string{"key", b.ks.Key("task", "1")}},
			{"prefix", false, "", b.ks.Key("task", "2"), []string{"prefix", b.ks.Prefix("task")}},
			{"namespace", true, "", ns.Key("page", "1"), []string{"namespace", ns.String()}},
			{"channel", false, b.cacheName + "-bus", b.ks.Key("task", "3"), []string{"key", b.ks.Key("task", "3")}},
		} {
			t.Run(tc.name, func(t *testing.T) {
				c := newCache(t, b, &cacheaside.Options[string]{Name: b.cacheName + "-" + tc.name, Namespaced: tc.namespaced,
					Local: &cacheaside.LocalOptions{TTL: time.Minute, Channel: tc.channel}})
				var loads atomic.Int64
				waitFor(t, "a local hit", func() bool { // the tier is used once its subscription is confirmed
					mustGet(t, c, tc.key, load("v", &loads))
					return c.Stats().LocalHits > 0
				})
				n := loads.Load()

				wrong := append([]string{"invalidate", "--cache", c.Name() + "-other"}, tc.args...)
				b.ok(t, wrong...)
				mustGet(t, c, tc.key, load("v", &loads))
				if loads.Load() != n {
					t.Fatalf("the loader ran after an invalidation on another channel: the control failed")
				}

				right := append([]string{"invalidate", "--cache", c.Name()}, tc.args...)
				if tc.channel != "" {
					right = append([]string{"invalidate", "--channel", tc.channel}, tc.args...)
				}
				out := b.ok(t, right...)
				channel := cmpOr(tc.channel, wire.BusChannelPrefix+c.Name())
				mustContain(t, out, "published on "+channel+" to 1 subscriber\n")
				waitFor(t, "the bus message", func() bool { return c.Stats().BusMessages > 0 })
				mustGet(t, c, tc.key, load("v", &loads))
				if loads.Load() != n+1 {
					t.Errorf("%d loads after the invalidation, want %d: the local tier still served its copy", loads.Load(), n+1)
				}
			})
		}
	})
}

// exist counts the keys that exist, one EXISTS each (on a cluster, they
// may be in different slots).
func (b *backend) exist(keys ...string) int64 {
	var n int64
	for _, k := range keys {
		n += b.rdb.Exists(ctx, k).Val()
	}
	return n
}

func cmpOr(a, b string) string {
	if a != "" {
		return a
	}
	return b
}
