// The Cache: New, Get and Close. Get's steps are door.go's, which GetMany
// shares; Set is with the other writes (invalidate.go), Stats with the
// metrics (metrics.go).

package cacheaside

import (
	"context"
	"fmt"
	"log/slog"
	"reflect"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/seed-b4ec662f/cacheaside/internal/flight"
)

// Cache is a typed cache-aside cache for values of type T stored in Redis.
// It is safe for concurrent use. Build one with New and stop it with Close.
type Cache[T any] struct {
	raw    Redis        // the client as given to New
	guard  *guarded     // every command goes through it: budgets and breakers (guard.go)
	leases *leases      // every lease script goes through it (lock.go)
	opts   Options[T]   // resolved: every default filled in
	name   string       // opts.Name
	warn   *slog.Logger // configuration problems: opts.Logger, or slog.Default() without one
	ev     *events      // every counted event: Stats and the Recorder
	logs   *logGate     // what of it reaches the logger (logs.go)

	group    flight.Group[answer[T]] // one in-process load per key (GetMany's keys too)
	inflight sync.Map                // key → *flightState of its newest flight in group
	flights  atomic.Uint64           // flights started, numbering them (flightState.seq)

	splitReads atomic.Bool // multi-key reads may cross slots: GetMany reads per key
	scanOne    bool        // a wrapper without ForEachMaster/ForEachShard: InvalidatePrefix scans the node it reaches

	loadSlots chan struct{} // MaxLoadsWhileDown slots for loads that bypass Redis (load.go)
	retries   *retryQueue   // failed invalidations to retry; the keys they cover bypass the cache (retry.go)
	refreshes *refreshGate  // the keys being refreshed in the background, and recent failures (refresh.go)

	closed atomic.Bool
	mu     sync.Mutex     // protects wg.Add against Close's wg.Wait
	wg     sync.WaitGroup // running flights and background refreshes
	stop   context.Context
	cancel context.CancelFunc

	local *localTier[T] // nil without Options.Local
	wake  *waker        // nil for a client without pub/sub, or a Ring
	hub   *hub          // the client's subscriptions and its way to publish; nil when wake is
	reads *coalescer    // nil with Options.NoReadCoalescing or a sharding client

	hooks *testHooks // nil outside tests

	releaseName func() // forgets this cache's Name (names.go); nil until New succeeds
}

// Loader loads the value for one key from the source of truth. It returns
// ErrNotFound (or an error Options.IsNotFound accepts) when the item does
// not exist. ctx is detached from the caller's cancellation and carries the
// load timeout. With early refresh or stale-while-revalidate, a loader may
// also run in the background after the Get that passed it has returned.
type Loader[T any] func(ctx context.Context) (T, error)

// New returns a Cache on rdb. It validates opts (nil means all defaults)
// and never waits for Redis, so it works while Redis is down. With
// Options.Local it starts one goroutine that subscribes to the
// invalidation bus; Close stops it.
func New[T any](rdb Redis, opts *Options[T]) (*Cache[T], error) {
	if rdb == nil {
		return nil, fmt.Errorf("%w: nil Redis client", ErrInvalidOptions)
	}
	if v := reflect.ValueOf(rdb); v.Kind() == reflect.Pointer && v.IsNil() {
		return nil, fmt.Errorf("%w: nil %T", ErrInvalidOptions, rdb)
	}
	o, err := opts.resolve()
	if err != nil {
		return nil, err
	}
	c := &Cache[T]{raw: rdb, opts: o, name: o.Name, ev: newEvents(o.Name, o.Recorder, o.Tracer), logs: &logGate{}, refreshes: newRefreshGate(o.LeaseTTL),
		loadSlots: make(chan struct{}, o.Degradation.MaxLoadsWhileDown), retries: newRetryQueue()}
	// Configuration warnings are not bounded by the log gate and go to
	// slog.Default() when no Logger was given: they break promises.
	c.warn = o.Logger
	if opts == nil || opts.Logger == nil {
		c.warn = slog.Default()
	}
	c.guard = &guarded{rdb: rdb, adapt: newAdaptive(o.Degradation.OpTimeout, o.Degradation.MaxOpTimeout), write: o.Degradation.WriteTimeout, ev: c.ev}
	if on, known := socketDeadlines(rdb); on || !known { // a wrapper is taken to pass deadlines on
		c.guard.sockets = true
	}
	if !o.Degradation.NoBreaker {
		c.guard.br = newBreakers(rdb, breakerSettings{name: o.Name, failures: o.Degradation.BreakerFailures,
			cooldown: o.Degradation.BreakerCooldown, log: o.Logger, ev: c.ev, logs: c.logs})
	}
	switch rdb.(type) {
	case *redis.ClusterClient, *redis.Ring:
		c.splitReads.Store(true)
	}
	// A generation key outlives every entry stamped with it; if it expires
	// anyway, a new random generation only turns old entries into misses.
	c.leases = &leases{g: c.guard, ttl: o.LeaseTTL, genTTL: 2*(o.Policy.TTL+o.Policy.staleWindow()) + o.LeaseTTL, format: o.Codec.Format()}
	c.stop, c.cancel = context.WithCancel(context.Background())
	if o.Local != nil {
		if _, ring := rdb.(*redis.Ring); ring {
			return nil, fmt.Errorf("%w: Options.Local does not work on a *redis.Ring: its pub/sub follows the live shards, so the invalidation bus can split without an error; use a Client or ClusterClient", ErrInvalidOptions)
		}
		if _, ok := rdb.(pubsubClient); !ok {
			return nil, fmt.Errorf("%w: Options.Local needs a client with Publish and Subscribe (the pubsubClient interface); %T has not", ErrInvalidOptions, rdb)
		}
		lo, err := o.Local.resolve(o.Name)
		if err != nil {
			return nil, err
		}
		var clock func() time.Time // nil: the tier's coarse clock
		if opts != nil && opts.Clock != nil {
			clock = o.Clock
		}
		if c.local, err = newLocalTier[T](lo, c.ev, clock); err != nil {
			return nil, err
		}
	}
	if bus, ok := rdb.(pubsubClient); ok {
		if _, ring := rdb.(*redis.Ring); !ring { // a Ring's pub/sub follows the live shards: poll only
			c.hub = joinHub(bus)
		}
	}
	if c.local != nil {
		c.wg.Add(1)
		go c.listen()
	}
	if c.hub != nil {
		c.wake = newWaker(wakeChannelPrefix + o.Name)
		c.leases.hub, c.leases.wake = c.hub, c.wake.channel
		c.wg.Add(1)
		go c.listenWake()
	}
	if !o.NoReadCoalescing {
		c.reads = newCoalescer()
		c.wg.Add(1)
		go func() {
			defer c.wg.Done()
			c.reads.run(c.stop, c.readKeys)
		}()
	}
	warn := c.warn
	c.scanOne = scansOneNode(rdb)
	if c.scanOne {
		warn.Warn("cacheaside: the client is a wrapper without ForEachMaster or ForEachShard, so InvalidatePrefix scans only the node it reaches; on a sharded client it returns an error once a CROSSSLOT reply shows the sharding",
			slog.String("cache", o.Name), slog.String("client", fmt.Sprintf("%T", rdb)))
	}
	warnClientOptions(c.raw, warn, o.Name)
	if !o.Policy.NoNegativeCache && o.Policy.NegativeTTL > o.Policy.TTL {
		warn.Warn("cacheaside: Policy.NegativeTTL is longer than Policy.TTL, so an item created after a lookup found it missing stays \"not found\" longer than a changed value stays stale; Invalidate its key when you create it, or shorten NegativeTTL",
			slog.String("cache", o.Name), slog.Duration("ttl", o.Policy.TTL), slog.Duration("negative_ttl", o.Policy.NegativeTTL))
	}
	release, err := claimName(rdb, o.Name, o.Codec)
	if err != nil {
		c.Close()
		return nil, err
	}
	c.releaseName = release
	return c, nil
}

// Name returns Options.Name.
func (c *Cache[T]) Name() string { return c.name }

// WaitLocal waits until the local tier (Options.Local) is live: its
// invalidation-bus subscription is confirmed (Stats.LocalLive), polling
// every millisecond or so, and returns nil then, ctx's error if ctx ends
// first, ErrClosed after Close, or an error matching ErrInvalidOptions for
// a cache without Options.Local. When the server refuses SUBSCRIBE (see
// ErrNoPubSub) it returns that error at once instead of waiting for a tier
// that cannot come up; the cache keeps trying now and then, so a later
// call may succeed if the server's configuration changes. A health check
// can call it with an already-ended ctx to learn the tier's state without
// waiting.
func (c *Cache[T]) WaitLocal(ctx context.Context) error {
	if c.local == nil {
		return fmt.Errorf("%w: cache %q has no local tier (Options.Local)", ErrInvalidOptions, c.name)
	}
	t := time.NewTicker(time.Millisecond)
	defer t.Stop()
	for !c.local.live.Load() {
		if c.closed.Load() {
			return ErrClosed
		}
		if r := c.local.refused.Load(); r != nil {
			return fmt.Errorf("%w: cache %q, channel %q: %w", ErrNoPubSub, c.name, c.local.opts.Channel, *r)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
	}
	return nil
}

// Get returns the value for key, loading it with load on a miss.
//
// A hit costs one GET (one MGET of the entry and its namespace generation
// for a namespaced cache). On a miss, one Get per key in this process runs
// the shared load (the others wait for it), and across processes the Redis
// lease lets one caller load while the rest wait for its fill. What Get
// returns:
//
//   - the value, from Redis or from load; past its TTL but inside the
//     policy's StaleWhileRevalidate window, the old value while one
//     background refresh runs; inside StaleIfError, the old value when the
//     reload fails;
//   - ErrNotFound itself when load reported the item absent, now or within
//     the policy's NegativeTTL (the loader's own "not found" error is not
//     passed on, so callers see the same error on a load and on a hit);
//   - load's own error, a *PanicError if it panicked, or a
//     context.DeadlineExceeded-wrapping error if it did not return within
//     Options.LoadTimeout; none of these is cached;
//   - ctx.Err() when ctx ends first (a shared load keeps running for the
//     other callers and still fills the cache);
//   - ErrClosed after Close, also for Gets whose load Close interrupted;
//   - ErrInvalidKey (also for a key without a namespace in a namespaced
//     cache), or an error for a nil load, before any I/O; so is an error
//     wrapping ErrInvalidOptions for invalid opts.
//
// opts, at most one, are this call's own choices: skip the local tier,
// reload now, do not store, a TTL of its own (see GetOptions). Without
// them Get allocates nothing more.
//
// Redis failures are not returned under the default FailOpen policy: Get
// falls back to load (at most MaxLoadsWhileDown at a time, else
// ErrOverloaded) and reports the failure to the logger, Recorder and
// OnError. Under FailClosed it returns an error matching
// ErrRedisUnavailable instead. Each Redis command gets Degradation.OpTimeout,
// and never more than half of what remains of ctx's deadline, so the
// loader keeps time to answer. Undecodable bytes under key count as a miss
// and are overwritten.
//
// Callers that share one load receive the same T, and so do all callers a
// local tier (Options.Local) answers while it holds the value. If T holds
// slices, maps or pointers, treat the result as read-only or copy it; a
// Redis hit decodes a fresh T for each caller.
func (c *Cache[T]) Get(ctx context.Context, key string, load Loader[T], opts ...GetOptions) (T, error) {
	var per GetOptions
	if len(opts) > 0 {
		var err error
		if per, err = c.perCall(opts); err != nil {
			var zero T
			return zero, err
		}
	}
	if c.opts.Tracer == nil {
		return c.one(ctx, key, 0, source[T]{one: load, per: per}, 0)
	}
	call := Call{Kind: callGet, Cache: c.name, Key: key, Keys: 1}
	ctx = c.opts.Tracer.Start(ctx, call)
	v, err := c.one(ctx, key, 0, source[T]{one: load, per: per}, 0)
	c.opts.Tracer.End(ctx, call, err)
	return v, err
}

// Close stops the cache: later calls return ErrClosed, loads and background
// refreshes in flight get a cancelled context, and Close waits for them to
// release or fill their leases. It is safe to call more than once and
// always returns nil.
func (c *Cache[T]) Close() error {
	c.mu.Lock()
	already := c.closed.Swap(true)
	c.mu.Unlock()
	if !already {
		c.cancel()
	}
	c.wg.Wait()
	if c.hub != nil && !already {
		leaveHub(c.hub)
	}
	if c.local != nil {
		c.local.close()
	}
	if c.releaseName != nil {
		c.releaseName()
	}
	return nil
}

// enter registers a running flight or refresh unless the cache is closed.
func (c *Cache[T]) enter() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed.Load() {
		return false
	}
	c.wg.Add(1)
	return true
}

// testHooks let tests in this package stop the protocol at chosen points
// and switch off parts of it to show that the tests can fail.
type testHooks struct {
	afterRead  func(key string)               // after the first read returned
	afterMiss  func(key string)               // after the first read missed, before the engine
	joined     func(key string)               // after joining (or starting) the key's in-process flight
	beforeFill func(key string)               // after the loader returned, before the fill
	fill       func(sc scriptCall) scriptCall // replaces a fill script (a broken protocol, for control tests)
	noExtend   bool                           // do not renew leases
	softAny    bool                           // every joined Get takes a soft answer unchecked (a broken protocol, for control tests)
	noTagCheck bool                           // reads ignore the tags' generations (a broken protocol, for control tests)
}
