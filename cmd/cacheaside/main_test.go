package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"github.com/seed-b4ec662f/cacheaside/internal/wire"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"
	"go.uber.org/goleak"

	"github.com/seed-b4ec662f/cacheaside"
)

// The tests run the command in-process (run) against Redis servers that
// caches of the real library wrote to:
//
//   - miniredis, through a Client and through a ClusterClient (--cluster;
//     miniredis answers CLUSTER SLOTS as a one-node cluster), always;
//   - the real Redis at $CACHEASIDE_REDIS_ADDR (host:port), when it is set;
//   - a 3-master Redis Cluster started from redis-server and redis-cli,
//     when $CACHEASIDE_REDIS_CLUSTER=1 (cluster_test.go).
//
// Every test uses its own keyspace and cache name, and deletes its keys.

func TestMain(m *testing.M) {
	redis.SetLogger(quietRedis{})
	code := m.Run()
	stopCluster()
	if code == 0 {
		// The library's budget timers run once when due, close a channel
		// and return (see the root package's budgetTimers).
		if err := goleak.Find(goleak.IgnoreTopFunction("github.com/seed-b4ec662f/cacheaside.(*budgetWheel).done.func1"),
			goleak.IgnoreTopFunction("github.com/seed-b4ec662f/cacheaside.closeAt.func1")); err != nil {
			fmt.Fprintln(os.Stderr, "goleak:", err)
			code = 1
		}
	}
	os.Exit(code)
}

const envRedisAddr = "CACHEASIDE_REDIS_ADDR"

// backend is one Redis the tests run on.
type backend struct {
	name      string
	flags     []string // connection flags for the command
	mr        *miniredis.Miniredis
	newClient func() redis.UniversalClient // a client of the test, as another process would have
	rdb       redis.UniversalClient        // the test's own client, for checks
	ks        cacheaside.Keyspace          // unique to the test
	cacheName string                       // unique to the test: its bus channel too
}

// forEachBackend runs f as a subtest on every backend.
func forEachBackend(t *testing.T, f func(t *testing.T, b *backend)) {
	t.Helper()
	t.Run("miniredis", func(t *testing.T) {
		mr := miniredis.RunT(t)
		f(t, newBackend(t, "miniredis", []string{"--redis", "redis://" + mr.Addr()}, mr, func() redis.UniversalClient {
			return redis.NewClient(&redis.Options{Addr: mr.Addr(), ContextTimeoutEnabled: true})
		}))
	})
	t.Run("miniredis-cluster", func(t *testing.T) {
		mr := miniredis.RunT(t)
		f(t, newBackend(t, "miniredis-cluster", []string{"--cluster", "--redis", "redis://" + mr.Addr()}, mr, func() redis.UniversalClient {
			return redis.NewClusterClient(&redis.ClusterOptions{Addrs: []string{mr.Addr()}, ContextTimeoutEnabled: true})
		}))
	})
	if addr := os.Getenv(envRedisAddr); addr != "" {
		t.Run("redis", func(t *testing.T) {
			b := newBackend(t, "redis", []string{"--redis", "redis://" + addr + "/0"}, nil, func() redis.UniversalClient {
				return redis.NewClient(&redis.Options{Addr: addr, ContextTimeoutEnabled: true})
			})
			if err := b.rdb.Ping(context.Background()).Err(); err != nil {
				t.Fatalf("%s=%s is set but Redis does not answer: %v", envRedisAddr, addr, err)
			}
			f(t, b)
		})
	}
	if os.Getenv(envCluster) == "1" {
		t.Run("cluster", func(t *testing.T) {
			addrs := clusterAddrs(t)
			url := "redis://" + addrs[0] + "?addr=" + strings.Join(addrs[1:], "&addr=")
			f(t, newBackend(t, "cluster", []string{"--cluster", "--redis", url}, nil, func() redis.UniversalClient {
				return redis.NewClusterClient(&redis.ClusterOptions{Addrs: addrs, ContextTimeoutEnabled: true})
			}))
		})
	}
}

func newBackend(t *testing.T, name string, flags []string, mr *miniredis.Miniredis, newClient func() redis.UniversalClient) *backend {
	var r [4]byte
	_, _ = rand.Read(r[:])
	unique := "cli-" + hex.EncodeToString(r[:])
	b := &backend{name: name, flags: flags, mr: mr, newClient: newClient, ks: cacheaside.MustKeyspace(unique, 1), cacheName: unique}
	b.rdb = b.client(t)
	t.Cleanup(func() { b.cleanup(t) })
	return b
}

// client returns a new client, closed at cleanup.
func (b *backend) client(t *testing.T) redis.UniversalClient {
	rdb := b.newClient()
	t.Cleanup(func() { _ = rdb.Close() })
	return rdb
}

// cleanup deletes the test's keys (all under its keyspace) on every node.
func (b *backend) cleanup(t *testing.T) {
	if b.mr != nil {
		return
	}
	rdb := b.newClient()
	defer rdb.Close()
	ctx := context.Background()
	err := forEachNode(ctx, rdb, func(ctx context.Context, n node) error {
		var cursor uint64
		for {
			keys, next, err := n.Scan(ctx, cursor, wire.EscapeGlob(b.ks.Prefix())+"*", 1000).Result()
			if err != nil {
				return err
			}
			if len(keys) > 0 {
				_, _ = n.Pipelined(ctx, func(p redis.Pipeliner) error {
					for _, k := range keys {
						p.Unlink(ctx, k)
					}
					return nil
				})
			}
			if cursor = next; cursor == 0 {
				return nil
			}
		}
	})
	if err != nil {
		t.Logf("cleanup: %v", err)
	}
}

// result is what one run of the command printed and returned.
type result struct {
	stdout, stderr string
	code           int
}

// cli runs the command with the backend's connection flags before args.
func (b *backend) cli(t *testing.T, args ...string) result {
	t.Helper()
	return runCLI(t, append(append([]string{}, b.flags...), args...)...)
}

func runCLI(t *testing.T, args ...string) result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var out, errb bytes.Buffer
	code := run(ctx, args, &out, &errb)
	return result{stdout: out.String(), stderr: errb.String(), code: code}
}

// ok runs the command and fails the test unless it exits 0.
func (b *backend) ok(t *testing.T, args ...string) string {
	t.Helper()
	r := b.cli(t, args...)
	if r.code != exitOK {
		t.Fatalf("cacheaside %s: exit %d\nstdout:\n%s\nstderr:\n%s", strings.Join(args, " "), r.code, r.stdout, r.stderr)
	}
	return r.stdout
}

// inspectJSON runs inspect --json on key and decodes its output.
func (b *backend) inspectJSON(t *testing.T, key string) inspection {
	t.Helper()
	var in inspection
	out := b.ok(t, "inspect", "--json", key)
	if err := json.Unmarshal([]byte(out), &in); err != nil {
		t.Fatalf("inspect --json output: %v\n%s", err, out)
	}
	return in
}

// newCache builds a Cache of the library on a new client of b, named
// after the test unless o names it, closed at cleanup.
func newCache[T any](t *testing.T, b *backend, o *cacheaside.Options[T]) *cacheaside.Cache[T] {
	t.Helper()
	if o == nil {
		o = &cacheaside.Options[T]{}
	}
	if o.Name == "" {
		o.Name = b.cacheName
	}
	if o.Degradation.OpTimeout == 0 {
		o.Degradation.OpTimeout = 2 * time.Second // not a test of budgets; -race and cluster discovery are slow
	}
	c, err := cacheaside.New[T](b.client(t), o)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// load returns a loader of v that counts its calls in n.
func load[T any](v T, n *atomic.Int64) cacheaside.Loader[T] {
	return func(context.Context) (T, error) {
		n.Add(1)
		return v, nil
	}
}

// waitFor polls cond until it holds, for up to 10s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func mustContain(t *testing.T, out string, want ...string) {
	t.Helper()
	for _, w := range want {
		if !strings.Contains(out, w) {
			t.Errorf("output lacks %q:\n%s", w, out)
		}
	}
}
