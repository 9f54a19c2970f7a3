package cacheaside

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"runtime/debug"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/seed-b4ec662f/cacheaside/internal/envelope"
	"github.com/seed-b4ec662f/cacheaside/internal/flight"
)

// Cache is a typed cache-aside cache for values of type T stored in Redis.
// It is safe for concurrent use. Build one with New and stop it with Close.
type Cache[T any] struct {
	rdb  Redis
	opts Options[T] // resolved: every default filled in
	name string     // opts.Name
	rec  Recorder   // opts.Recorder

	group flight.Group[T] // one in-process load per key
	stats counters

	closed atomic.Bool
	mu     sync.Mutex     // protects wg.Add against Close's wg.Wait
	wg     sync.WaitGroup // running flights
	stop   context.Context
	cancel context.CancelFunc

	hooks *testHooks // nil outside tests
}

// Loader loads the value for one key from the source of truth. It returns
// ErrNotFound (or an error Options.IsNotFound accepts) when the item does
// not exist. ctx is detached from the caller's cancellation and carries the
// load timeout.
type Loader[T any] func(ctx context.Context) (T, error)

// New returns a Cache on rdb. It validates opts (nil means all defaults)
// and never talks to Redis, so it works while Redis is down.
func New[T any](rdb Redis, opts *Options[T]) (*Cache[T], error) {
	if rdb == nil {
		return nil, fmt.Errorf("%w: nil Redis client", ErrInvalidOptions)
	}
	o, err := opts.resolve()
	if err != nil {
		return nil, err
	}
	c := &Cache[T]{rdb: rdb, opts: o, name: o.Name, rec: o.Recorder}
	c.stop, c.cancel = context.WithCancel(context.Background())
	warnClientOptions(rdb, o.Logger, o.Name)
	return c, nil
}

// warnClientOptions logs once, at New, when a go-redis client will not put
// a context deadline on the socket.
func warnClientOptions(rdb Redis, log *slog.Logger, name string) {
	var enabled, known bool
	switch c := rdb.(type) {
	case *redis.Client:
		enabled, known = c.Options().ContextTimeoutEnabled, true
	case *redis.ClusterClient:
		enabled, known = c.Options().ContextTimeoutEnabled, true
	case *redis.Ring:
		enabled, known = c.Options().ContextTimeoutEnabled, true
	}
	if known && !enabled {
		log.Warn("cacheaside: go-redis ContextTimeoutEnabled is false, so context deadlines do not reach the socket and a hung Redis can hold a Get for the client's ReadTimeout; set ContextTimeoutEnabled: true",
			slog.String("cache", name))
	}
}

// Name returns Options.Name.
func (c *Cache[T]) Name() string { return c.name }

// Stats returns a snapshot of the cache's counters.
func (c *Cache[T]) Stats() Stats { return c.stats.snapshot() }

// Get returns the value for key, loading it with load on a miss.
//
// A hit costs one GET. On a miss, one Get per key in this process runs the
// shared load (the others wait for it), and across processes the Redis
// lease lets one caller load while the rest wait for its fill. What Get
// returns:
//
//   - the value, from Redis or from load;
//   - ErrNotFound itself when load reported the item absent, now or within
//     the policy's NegativeTTL (the loader's own "not found" error is not
//     passed on, so callers see the same error on a load and on a hit);
//   - load's own error, a *PanicError if it panicked, or a
//     context.DeadlineExceeded-wrapping error if it did not return within
//     Options.LoadTimeout; none of these is cached;
//   - ctx.Err() when ctx ends first (a shared load keeps running for the
//     other callers and still fills the cache);
//   - ErrClosed after Close, also for Gets whose load Close interrupted;
//   - ErrInvalidKey, or an error for a nil load, before any I/O.
//
// Redis failures are never returned: Get falls back to load and reports
// the failure to the logger, Recorder and OnError. Undecodable bytes under
// key count as a miss and are overwritten.
//
// Callers that share one load receive the same T. If T holds slices, maps
// or pointers, treat the result as read-only or copy it; a hit decodes a
// fresh T for each caller.
func (c *Cache[T]) Get(ctx context.Context, key string, load Loader[T]) (T, error) {
	var zero T
	if err := checkKey(key, c.opts.MaxKeySize); err != nil {
		return zero, err
	}
	if load == nil {
		return zero, errNilLoader
	}
	if c.closed.Load() {
		return zero, ErrClosed
	}
	b, err := c.rdb.Get(ctx, key).Bytes()
	var replace []byte // token of an undecodable entry the load may overwrite
	redisDown := false
	switch {
	case err == nil:
		v, kind, r := c.decode(ctx, key, b)
		switch kind {
		case envelope.Value:
			c.stats.hits.Add(1)
			c.rec.Hit(c.name)
			return v, nil
		case envelope.NotFound:
			c.stats.negativeHits.Add(1)
			c.rec.NegativeHit(c.name)
			return zero, ErrNotFound
		}
		// A lease (another caller is loading; the shared load waits for
		// it) or undecodable bytes (the shared load overwrites them).
		replace = r
	case errors.Is(err, redis.Nil):
	case isWrongType(err):
		// Not a string: foreign data under our key. acquire.lua replaces it.
		c.corrupt(ctx, key, nil, err)
	default:
		if cerr := ctx.Err(); cerr != nil {
			// The caller's own deadline, not a Redis failure.
			c.stats.misses.Add(1)
			c.rec.Miss(c.name)
			return zero, cerr
		}
		c.redisError(ctx, "get", key, err)
		redisDown = true
	}
	c.stats.misses.Add(1)
	c.rec.Miss(c.name)
	if h := c.hooks; h != nil && h.afterMiss != nil {
		h.afterMiss(key)
	}
	return c.shared(ctx, key, load, replace, redisDown)
}

var errNilLoader = errors.New("cacheaside: Get with a nil Loader")

// shared runs one load per key in this process and waits for it on ctx.
func (c *Cache[T]) shared(ctx context.Context, key string, load Loader[T], replace []byte, redisDown bool) (T, error) {
	leader := false
	ch := c.group.DoChan(key, func() (v T, err error) {
		leader = true
		// x/sync re-panics a DoChan panic where nobody can recover it, so
		// a panic anywhere in the flight (a codec, a hook, a Recorder)
		// becomes an error for its callers instead. Loader panics are
		// caught closer, in callLoader, where the lease is released.
		defer func() {
			if r := recover(); r != nil {
				err = &PanicError{Value: r, Stack: debug.Stack()}
			}
		}()
		return c.run(ctx, key, load, replace, redisDown)
	})
	select {
	case r := <-ch:
		if !leader {
			c.stats.coalesced.Add(1)
			c.rec.Coalesced(c.name)
		}
		return flight.Value[T](r), r.Err
	case <-ctx.Done():
		var zero T
		return zero, ctx.Err()
	}
}

// run is the body of a shared load: take the lease (or wait for whoever
// holds it), call the loader, fill or release. parent is the context of
// the Get that started it; run uses its values, never its cancellation.
func (c *Cache[T]) run(parent context.Context, key string, load Loader[T], replace []byte, redisDown bool) (v T, err error) {
	var zero T
	if !c.enter() {
		return zero, ErrClosed
	}
	defer c.wg.Done()
	ctx, cancel := context.WithCancel(context.WithoutCancel(parent))
	defer cancel()
	defer context.AfterFunc(c.stop, cancel)()
	defer func() {
		if err != nil && c.stop.Err() != nil && errors.Is(err, context.Canceled) {
			err = ErrClosed
		}
	}()

	if redisDown {
		return c.loadUncached(ctx, load)
	}
	tok := newToken()
	lease := leaseEntry(tok, c.opts.Codec.Format())
	var (
		waitStart time.Time
		delay     = c.opts.PollMin
		waitCap   = c.opts.LoadTimeout + c.opts.LeaseTTL
	)
	for {
		held, cur, err := acquire(ctx, c.rdb, key, lease, c.opts.LeaseTTL, replace)
		if err != nil {
			if ctx.Err() != nil { // Close
				return zero, ctx.Err()
			}
			c.redisError(ctx, "acquire", key, err)
			// The script may have run and only its reply been lost: drop
			// the lease it may have taken so nobody waits for it.
			rctx, rcancel := context.WithTimeout(context.WithoutCancel(ctx), c.opts.LeaseTTL)
			_, _ = release(rctx, c.rdb, key, tok)
			rcancel()
			return c.loadUncached(ctx, load)
		}
		if held {
			c.waited(waitStart)
			return c.loadAndFill(ctx, key, load, tok)
		}
		v, kind, r := c.decode(ctx, key, cur)
		switch kind {
		case envelope.Value:
			c.waited(waitStart)
			return v, nil
		case envelope.NotFound:
			c.waited(waitStart)
			return zero, ErrNotFound
		case 0: // undecodable: take it over on the next attempt
			replace = r
			continue
		}
		replace = nil
		// Another caller holds the lease: wait for its fill, or for the
		// lease to expire if the holder died.
		if waitStart.IsZero() {
			waitStart = time.Now()
			c.stats.leaseContended.Add(1)
			c.rec.LeaseContended(c.name)
		} else if time.Since(waitStart) > waitCap {
			// The holder neither filled nor let its lease lapse in the time
			// a load may take: answer from the source rather than wait on.
			c.waited(waitStart)
			return c.loadUncached(ctx, load)
		}
		if err := sleep(ctx, jitter(delay)); err != nil {
			return zero, err
		}
		delay = min(2*delay, c.opts.PollMax)
	}
}

func (c *Cache[T]) waited(start time.Time) {
	if !start.IsZero() {
		c.rec.Waited(c.name, time.Since(start))
	}
}

// loadAndFill calls the loader while holding tok's lease and stores the
// outcome: a value, a tombstone, or nothing (the lease is released).
func (c *Cache[T]) loadAndFill(ctx context.Context, key string, load Loader[T], tok envelope.Token) (T, error) {
	var zero T
	stopExtend := c.keepLease(ctx, key, tok)
	v, took, err := c.callLoader(ctx, load)
	stopExtend()
	if h := c.hooks; h != nil && h.beforeFill != nil {
		h.beforeFill(key)
	}
	// Fill and release must happen even if Close cancelled ctx.
	wctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), c.opts.LeaseTTL)
	defer cancel()
	if err != nil {
		if !c.isNotFound(err) {
			c.release(wctx, key, tok)
			return zero, err
		}
		if c.opts.Policy.NoNegativeCache {
			c.release(wctx, key, tok)
			return zero, ErrNotFound
		}
		c.store(wctx, key, tok, tombstone(tok, c.opts.Codec.Format()), c.opts.Policy.jitter(c.opts.Policy.NegativeTTL))
		return zero, ErrNotFound
	}
	payload, merr := c.opts.Codec.Marshal(v)
	if merr == nil && len(payload) > c.opts.MaxValueSize {
		merr = fmt.Errorf("%w: %d bytes, MaxValueSize %d", ErrValueTooLarge, len(payload), c.opts.MaxValueSize)
	}
	if merr != nil {
		c.stats.notCached.Add(1)
		c.rec.NotCached(c.name)
		c.report(ctx, "encode", key, merr)
		c.release(wctx, key, tok)
		return v, nil
	}
	entry := envelope.Encode(&envelope.Entry{
		Kind:       envelope.Value,
		Format:     c.opts.Codec.Format(),
		Token:      tok,
		LoadMillis: uint32(min(took.Milliseconds(), 1<<32-1)),
		Payload:    payload,
	})
	c.store(wctx, key, tok, entry, c.opts.Policy.jitter(c.opts.Policy.TTL))
	return v, nil
}

// store fills key with entry if tok's lease is still there.
func (c *Cache[T]) store(ctx context.Context, key string, tok envelope.Token, entry []byte, ttl time.Duration) {
	if h := c.hooks; h != nil && h.noTokenCheck {
		if err := c.rdb.Set(ctx, key, entry, ttl).Err(); err != nil {
			c.redisError(ctx, "fill", key, err)
		}
		return
	}
	ok, err := fill(ctx, c.rdb, key, tok, entry, ttl)
	switch {
	case err != nil:
		c.redisError(ctx, "fill", key, err)
	case !ok:
		c.stats.fillsRejected.Add(1)
		c.rec.FillRejected(c.name)
	}
}

func (c *Cache[T]) release(ctx context.Context, key string, tok envelope.Token) {
	if _, err := release(ctx, c.rdb, key, tok); err != nil {
		c.redisError(ctx, "release", key, err)
	}
}

// keepLease renews tok's lease every LeaseTTL/3 until the returned stop is
// called (it waits for the renewing goroutine to end) or the lease is gone.
func (c *Cache[T]) keepLease(ctx context.Context, key string, tok envelope.Token) (stop func()) {
	if h := c.hooks; h != nil && h.noExtend {
		return func() {}
	}
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		t := time.NewTicker(c.opts.LeaseTTL / 3)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
			ok, err := extend(ctx, c.rdb, key, tok, c.opts.LeaseTTL)
			if err != nil {
				if ctx.Err() != nil {
					return
				}
				c.redisError(ctx, "extend", key, err)
				continue
			}
			if !ok {
				return // revoked: the fill will be refused too
			}
		}
	}()
	return func() { cancel(); <-done }
}

// loadUncached calls the loader without touching Redis, for when Redis
// failed: the caller still gets an answer.
func (c *Cache[T]) loadUncached(ctx context.Context, load Loader[T]) (T, error) {
	v, _, err := c.callLoader(ctx, load)
	if err != nil && c.isNotFound(err) {
		return v, ErrNotFound
	}
	return v, err
}

// callLoader runs load on its own goroutine under the load timeout and
// returns what it returned, or a *PanicError if it panicked, or
// errLoaderExited if it called runtime.Goexit, or the context's error if
// the timeout (or Close) came first. A loader that ignores its context is
// abandoned at that point: it keeps running until it returns, but nobody
// waits for it and its result is dropped.
func (c *Cache[T]) callLoader(ctx context.Context, load Loader[T]) (v T, took time.Duration, err error) {
	ctx, cancel := context.WithTimeout(ctx, c.opts.LoadTimeout)
	defer cancel()
	type result struct {
		v   T
		err error
	}
	done := make(chan result, 1)
	start := time.Now()
	go func() {
		normal := false
		defer func() {
			if normal {
				return
			}
			if r := recover(); r != nil {
				done <- result{err: &PanicError{Value: r, Stack: debug.Stack()}}
				return
			}
			done <- result{err: errLoaderExited}
		}()
		v, err := load(ctx)
		normal = true
		done <- result{v, err}
	}()
	select {
	case r := <-done:
		v, err = r.v, r.err
	case <-ctx.Done():
		err = fmt.Errorf("cacheaside: loader did not return within its context: %w", ctx.Err())
	}
	took = time.Since(start)
	if err != nil && !c.isNotFound(err) {
		c.stats.loadErrors.Add(1)
	} else {
		c.stats.loads.Add(1)
	}
	c.stats.loadNanos.Add(uint64(took))
	c.rec.Load(c.name, took, err)
	return v, took, err
}

// errLoaderExited is returned to the callers of a load whose loader called
// runtime.Goexit (for example t.FailNow in a test).
var errLoaderExited = errors.New("cacheaside: loader called runtime.Goexit")

// Set writes v under key (write-through), for a caller that already has the
// fresh value, typically right after committing it. It replaces whatever
// the key held, including a lease, so a load in flight cannot overwrite v
// with what it read before. Errors are returned (and reported): an encoding
// error or a value over MaxValueSize deletes the key instead, so no older
// value outlives the write; a Redis error leaves the old entry to expire by
// its TTL.
func (c *Cache[T]) Set(ctx context.Context, key string, v T) error {
	if err := checkKey(key, c.opts.MaxKeySize); err != nil {
		return err
	}
	if c.closed.Load() {
		return ErrClosed
	}
	payload, err := c.opts.Codec.Marshal(v)
	if err == nil && len(payload) > c.opts.MaxValueSize {
		err = fmt.Errorf("%w: %d bytes, MaxValueSize %d", ErrValueTooLarge, len(payload), c.opts.MaxValueSize)
	}
	if err != nil {
		c.stats.notCached.Add(1)
		c.rec.NotCached(c.name)
		operr := c.report(ctx, "encode", key, err)
		if derr := c.Invalidate(ctx, key); derr != nil {
			return errors.Join(operr, derr)
		}
		return operr
	}
	entry := envelope.Encode(&envelope.Entry{
		Kind:    envelope.Value,
		Format:  c.opts.Codec.Format(),
		Token:   newToken(),
		Payload: payload,
	})
	// A Get that starts after Set returns must not join a load that began
	// before it: that load's value predates v.
	c.group.Forget(key)
	if err := c.rdb.Set(ctx, key, entry, c.opts.Policy.jitter(c.opts.Policy.TTL)).Err(); err != nil {
		return c.redisError(ctx, "set", key, err)
	}
	return nil
}

// Invalidate deletes keys with UNLINK, which also revokes any lease on
// them: a load that started before the call cannot fill afterwards. Call it
// after the write to the source of truth has committed. All keys are
// validated before anything is sent; several keys go in one pipeline. A
// Redis error is returned (and reported): the entries then live until their
// TTL ends.
func (c *Cache[T]) Invalidate(ctx context.Context, keys ...string) error {
	for _, k := range keys {
		if err := checkKey(k, c.opts.MaxKeySize); err != nil {
			return err
		}
	}
	if c.closed.Load() {
		return ErrClosed
	}
	if len(keys) == 0 {
		return nil
	}
	// A Get that starts after Invalidate returns must not join an
	// in-process load that began before it and read the old row. (The old
	// load's fill is refused by its lease; this covers its callers.)
	for _, k := range keys {
		c.group.Forget(k)
	}
	var (
		n   int64
		err error
	)
	if len(keys) == 1 {
		n, err = c.rdb.Unlink(ctx, keys[0]).Result()
	} else {
		// One UNLINK per key: Redis Cluster refuses multi-key commands
		// across slots, and the pipeline still costs one round trip per node.
		var cmds []redis.Cmder
		cmds, err = c.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
			for _, k := range keys {
				p.Unlink(ctx, k)
			}
			return nil
		})
		for _, cmd := range cmds {
			if ic, ok := cmd.(*redis.IntCmd); ok && ic.Err() == nil {
				n += ic.Val()
			}
		}
	}
	if n > 0 {
		c.stats.invals.Add(uint64(n))
		c.rec.Invalidated(c.name, int(n))
	}
	if err != nil {
		return c.redisError(ctx, "invalidate", keysLabel(keys), err)
	}
	return nil
}

func keysLabel(keys []string) string {
	if len(keys) == 1 {
		return keys[0]
	}
	return fmt.Sprintf("%s (+%d more)", keys[0], len(keys)-1)
}

// Close stops the cache: later calls return ErrClosed, loads in flight get
// a cancelled context, and Close waits for them to release or fill their
// leases. It is safe to call more than once and always returns nil.
func (c *Cache[T]) Close() error {
	c.mu.Lock()
	already := c.closed.Swap(true)
	c.mu.Unlock()
	if !already {
		c.cancel()
	}
	c.wg.Wait()
	return nil
}

// enter registers a running flight unless the cache is closed.
func (c *Cache[T]) enter() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed.Load() {
		return false
	}
	c.wg.Add(1)
	return true
}

// decode reads the bytes found under key. kind is Value (with v),
// NotFound, Lease, or 0 for bytes that cannot be decoded, which are counted
// and reported; replace is then the token acquire.lua needs to overwrite
// them.
func (c *Cache[T]) decode(ctx context.Context, key string, b []byte) (v T, kind envelope.Kind, replace []byte) {
	var e envelope.Entry
	if err := envelope.Decode(b, &e); err != nil {
		return v, 0, c.corrupt(ctx, key, b, err)
	}
	if e.Kind != envelope.Value {
		return v, e.Kind, nil
	}
	if e.Format != c.opts.Codec.Format() {
		return v, 0, c.corrupt(ctx, key, b, fmt.Errorf("codec format %d, this cache uses %d", e.Format, c.opts.Codec.Format()))
	}
	if err := c.opts.Codec.Unmarshal(e.Payload, &v); err != nil {
		var zero T
		return zero, 0, c.corrupt(ctx, key, b, err)
	}
	return v, envelope.Value, nil
}

// corrupt counts and reports undecodable bytes under key and returns the
// token the load may use to overwrite them (nil when the header itself is
// foreign, which acquire.lua overwrites on its own).
func (c *Cache[T]) corrupt(ctx context.Context, key string, b []byte, err error) []byte {
	c.stats.decodeErrors.Add(1)
	c.rec.DecodeError(c.name)
	c.report(ctx, "decode", key, fmt.Errorf("%w: %w", ErrCorruptEntry, err))
	if len(b) >= envelope.HeaderSize && b[0] == envelope.Magic && b[1] == envelope.Version {
		return b[envelope.TokenOffset : envelope.TokenOffset+envelope.TokenSize]
	}
	return nil
}

// isWrongType reports a WRONGTYPE reply: the key holds a non-string.
func isWrongType(err error) bool {
	var re redis.Error
	return errors.As(err, &re) && strings.HasPrefix(re.Error(), "WRONGTYPE")
}

// redisError counts a failed Redis command and reports it.
func (c *Cache[T]) redisError(ctx context.Context, op, key string, err error) error {
	c.stats.redisErrors.Add(1)
	c.rec.RedisError(c.name, op, err)
	return c.report(ctx, op, key, err)
}

// report sends err to the logger and OnError and returns it as an *OpError.
func (c *Cache[T]) report(ctx context.Context, op, key string, err error) error {
	e := &OpError{Cache: c.name, Op: op, Key: key, Err: err}
	c.opts.Logger.LogAttrs(ctx, slog.LevelWarn, "cacheaside: suppressed error",
		slog.String("cache", c.name), slog.String("op", op), slog.String("key", key), slog.Any("err", err))
	if c.opts.OnError != nil {
		c.opts.OnError(ctx, e)
	}
	return e
}

// jitter returns d scaled by a random factor in [0.5, 1.5).
func jitter(d time.Duration) time.Duration {
	return time.Duration(float64(d) * (0.5 + rand.Float64()))
}

// sleep waits for d or until ctx ends.
func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// testHooks let tests in this package stop the protocol at chosen points
// and switch off parts of it to show that the tests can fail.
type testHooks struct {
	afterMiss    func(key string) // after the first read missed, before the shared load
	beforeFill   func(key string) // after the loader returned, before the fill
	noTokenCheck bool             // fill with a plain SET (a broken protocol, for control tests)
	noExtend     bool             // do not renew leases
}
