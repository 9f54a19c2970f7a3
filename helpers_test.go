package cacheaside

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"github.com/seed-b4ec662f/cacheaside/internal/wire"
	"log/slog"
	"net"
	"os"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"
	"go.uber.org/goleak"

	"github.com/seed-b4ec662f/cacheaside/internal/envelope"
)

func TestMain(m *testing.M) {
	redis.SetLogger(quietRedis{}) // go-redis's own dial-retry lines; the tests count errors themselves
	// Configuration warnings go to slog.Default when a cache has no
	// Logger: the suite's wrapper clients would log one per cache.
	slog.SetDefault(slog.New(slog.DiscardHandler))
	goleak.VerifyTestMain(m, budgetTimers...)
}

// budgetTimers are the callbacks of the operation budgets' timers
// (budget.go): each runs once when its timer fires, closes a channel and
// returns, at most a budget (seconds) after the command that set it. A
// test binary that ends while some are due, as on a starved core, is not
// leaking them. Nor is it leaking go-redis's dial prober, below.
var budgetTimers = []goleak.Option{
	goleak.IgnoreTopFunction("github.com/seed-b4ec662f/cacheaside.(*budgetWheel).done.func1"),
	goleak.IgnoreTopFunction("github.com/seed-b4ec662f/cacheaside.closeAt.func1"),
	// go-redis's own dial prober: after a pool's dials failed (a killed
	// Cluster master) it sleeps a second between dials, and sees its
	// client closed only when it wakes.
	goleak.IgnoreAnyFunction("github.com/redis/go-redis/v9/internal/pool.(*ConnPool).tryDial"),
}

type quietRedis struct{}

func (quietRedis) Printf(context.Context, string, ...any) {}

// envRedisAddr names the real Redis the suite also runs on when set.
const envRedisAddr = "CACHEASIDE_REDIS_ADDR"

// backend is one Redis the scenarios run on: miniredis always, and the
// real server at $CACHEASIDE_REDIS_ADDR when that is set.
type backend struct {
	name   string
	addr   string
	mr     *miniredis.Miniredis // nil for a real server
	prefix string               // unique per test, so tests never share keys
}

// forEachBackend runs f as a subtest on every backend.
func forEachBackend(t *testing.T, f func(t *testing.T, b *backend)) {
	t.Helper()
	t.Run("miniredis", func(t *testing.T) {
		mr := miniredis.RunT(t)
		f(t, &backend{name: "miniredis", addr: mr.Addr(), mr: mr, prefix: uniquePrefix()})
	})
	addr := os.Getenv(envRedisAddr)
	if addr == "" {
		return
	}
	t.Run("redis", func(t *testing.T) {
		b := &backend{name: "redis", addr: addr, prefix: uniquePrefix()}
		rdb := b.client(t)
		if err := rdb.Ping(context.Background()).Err(); err != nil {
			t.Fatalf("%s=%s is set but Redis does not answer: %v", envRedisAddr, addr, err)
		}
		t.Cleanup(func() { b.cleanup(t) })
		f(t, b)
	})
}

func uniquePrefix() string {
	var b [6]byte
	_, _ = rand.Read(b[:])
	return "test:" + hex.EncodeToString(b[:]) + ":"
}

// client returns a new go-redis client, like a separate process would have.
func (b *backend) client(t testing.TB) *redis.Client {
	t.Helper()
	rdb := redis.NewClient(&redis.Options{Addr: b.addr, ContextTimeoutEnabled: true, PoolSize: 64})
	t.Cleanup(func() { _ = rdb.Close() })
	return rdb
}

// key returns a key unique to this test.
func (b *backend) key(s string) string { return b.prefix + s }

// advance moves Redis's clock: instantly on miniredis, by sleeping on a
// real server.
func (b *backend) advance(d time.Duration) {
	if b.mr != nil {
		b.mr.FastForward(d)
		return
	}
	time.Sleep(d)
}

func (b *backend) cleanup(t *testing.T) {
	rdb := redis.NewClient(&redis.Options{Addr: b.addr})
	defer rdb.Close()
	ctx := context.Background()
	// Keys start with the prefix, or hold it as an escaped part (namespaces).
	for _, pattern := range []string{wire.EscapeGlob(b.prefix) + "*", "*" + wire.EscapeGlob(wire.EscapePart(b.prefix)) + "*"} {
		iter := rdb.Scan(ctx, 0, pattern, 1000).Iterator()
		for iter.Next(ctx) {
			rdb.Unlink(ctx, iter.Val())
		}
		if err := iter.Err(); err != nil {
			t.Logf("cleanup of %s: %v", pattern, err)
		}
	}
}

// raw reads the bytes under key, or nil if it is absent.
func (b *backend) raw(t *testing.T, key string) []byte {
	t.Helper()
	rdb := b.client(t)
	v, err := rdb.Get(context.Background(), key).Bytes()
	if err == redis.Nil {
		return nil
	}
	if err != nil {
		t.Fatalf("GET %s: %v", key, err)
	}
	return v
}

// newCache builds a Cache on a new client of b and closes it at cleanup.
//
// Tests that are not about the operation budget get a generous one: 1,000
// goroutines on one miniredis under -race can queue longer than the 50ms
// default for a connection, and the test would measure the machine.
func newCache[T any](t *testing.T, b *backend, o *Options[T]) *Cache[T] {
	t.Helper()
	if o == nil {
		o = &Options[T]{}
	}
	if o.Degradation.OpTimeout == 0 {
		o.Degradation.OpTimeout = 2 * time.Second
	}
	c, err := New[T](b.client(t), o)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// closedAddr returns a loopback address nothing listens on.
func closedAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	_ = l.Close()
	return addr
}

// counter is a loader that counts its calls.
type counter struct {
	calls atomic.Int64
}

func (c *counter) load(v string, d time.Duration) Loader[string] {
	return func(ctx context.Context) (string, error) {
		c.calls.Add(1)
		if d > 0 {
			select {
			case <-time.After(d):
			case <-ctx.Done():
				return "", ctx.Err()
			}
		}
		return v, nil
	}
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

func miniredisRun(t *testing.T) *miniredis.Miniredis {
	t.Helper()
	return miniredis.RunT(t)
}

// fakeClock is an Options.Clock the test moves by hand.
type fakeClock struct{ ns atomic.Int64 }

func newFakeClock() *fakeClock {
	c := &fakeClock{}
	c.ns.Store(time.Date(2026, 11, 27, 12, 0, 0, 0, time.UTC).UnixNano())
	return c
}

func (c *fakeClock) Now() time.Time          { return time.Unix(0, c.ns.Load()) }
func (c *fakeClock) Advance(d time.Duration) { c.ns.Add(int64(d)) }

// plainFillScript fills without checking the lease: the broken protocol
// the control runs use to show that the tests can fail.
var plainFillScript = redis.NewScript(`redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) return 1`)

// noTokenCheck returns the testHooks.fill that replaces every fill by a
// plain SET when on, and nil (the real fill) when not.
func noTokenCheck(on bool) func(scriptCall) scriptCall {
	if !on {
		return nil
	}
	return func(sc scriptCall) scriptCall {
		return scriptCall{s: plainFillScript, keys: sc.keys[:1], args: sc.args, write: true}
	}
}

// The lease scripts one at a time on any client, for tests that play
// another process: one that holds, fills or releases a lease.

func (sc scriptCall) on(ctx context.Context, rdb Redis) *redis.Cmd {
	return sc.s.Run(ctx, rdb, sc.keys, sc.args...)
}

// acquire takes tok's lease on key for ttl (a JSON-format lease entry),
// and returns whether it did and, if not, the entry in its place.
func acquire(ctx context.Context, rdb Redis, key string, tok envelope.Token, ttl time.Duration) (held bool, cur []byte, err error) {
	l := &leases{ttl: ttl, genTTL: time.Minute, format: formatJSON}
	held, _, cur, err = acquireReply(l.acquire(key, "", tok, nil, nil).on(ctx, rdb).Slice())
	return held, cur, err
}

// fill writes entry for ttl under tok's lease (genKey: the namespace's
// generation key, or "", which lives for genTTL), waking nobody.
func fill(ctx context.Context, rdb Redis, key, genKey string, tok envelope.Token, entry []byte, ttl, genTTL time.Duration) (bool, error) {
	l := &leases{genTTL: genTTL}
	n, err := l.fill(key, genKey, tok, envelope.Token{}, entry, ttl).on(ctx, rdb).Int64()
	return n == 1 || n == 2, err // 2: written for a contended lease, nothing published
}

// release deletes tok's lease, or puts tok's refreshing entry back for keep.
func release(ctx context.Context, rdb Redis, key string, tok envelope.Token, keep time.Duration) (bool, error) {
	n, err := (&leases{}).release(key, tok, keep).on(ctx, rdb).Int64()
	return n == 1 || n == 2, err
}

// extend renews tok's lease for ttl.
func extend(ctx context.Context, rdb Redis, key string, tok envelope.Token, ttl time.Duration) (bool, error) {
	n, err := (&leases{ttl: ttl}).extend(key, tok).on(ctx, rdb).Int64()
	return n == 1, err
}

// refreshLease turns the value written under old into a refreshing entry
// held by tok for ttl.
func refreshLease(ctx context.Context, rdb Redis, key string, old, tok envelope.Token, ttl time.Duration) (bool, error) {
	n, err := (&leases{ttl: ttl, genTTL: time.Minute}).refresh(key, "", old, tok, false).on(ctx, rdb).Int64()
	return n == 1, err
}

// envSeed returns the seed in the environment variable name, if it is set.
func envSeed(t *testing.T, name string) (uint64, bool) {
	t.Helper()
	s := os.Getenv(name)
	if s == "" {
		return 0, false
	}
	seed, err := strconv.ParseUint(s, 10, 64)
	if err != nil {
		t.Fatalf("%s=%q: %v", name, s, err)
	}
	return seed, true
}
