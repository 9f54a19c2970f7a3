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
	rdb    Redis      // the client behind the operation budget and the breaker
	raw    Redis      // the client as given to New
	guard  *guarded   // rdb
	opts   Options[T] // resolved: every default filled in
	name   string     // opts.Name
	rec    Recorder   // opts.Recorder
	genTTL time.Duration

	group    flight.Group[answer[T]] // one in-process load per key (GetMany's keys too)
	inflight sync.Map                // key → *flightState of its newest flight in group
	flights  atomic.Uint64           // flights started, numbering them (flightState.seq)

	splitReads atomic.Bool // multi-key reads may cross slots: GetMany reads per key
	stats      counters

	loadSlots chan struct{} // MaxLoadsWhileDown slots for loads that bypass Redis

	retryMu  sync.Mutex         // protects retries and retrying
	retries  map[string]retryOp // failed invalidations to retry, by what they invalidate
	retrying bool               // the retry goroutine runs

	refreshMu sync.Mutex           // protects refreshes
	refreshes map[string]time.Time // key → zero while a background refresh runs, else when the last one failed

	closed atomic.Bool
	mu     sync.Mutex     // protects wg.Add against Close's wg.Wait
	wg     sync.WaitGroup // running flights and background refreshes
	stop   context.Context
	cancel context.CancelFunc

	local *localTier[T] // nil without Options.Local
	reads *coalescer    // nil with Options.NoReadCoalescing or a sharding client

	hooks *testHooks // nil outside tests
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
	o, err := opts.resolve()
	if err != nil {
		return nil, err
	}
	c := &Cache[T]{raw: rdb, opts: o, name: o.Name, rec: o.Recorder, refreshes: make(map[string]time.Time),
		loadSlots: make(chan struct{}, o.MaxLoadsWhileDown), retries: make(map[string]retryOp)}
	c.guard = &guarded{rdb: rdb, budget: o.OpTimeout}
	if !o.NoBreaker {
		c.guard.cb = newBreaker(o.Name, o.BreakerFailures, o.BreakerCooldown, o.Logger, o.Recorder, &c.stats.breakerOpens)
	}
	c.rdb = c.guard
	switch rdb.(type) {
	case *redis.ClusterClient, *redis.Ring:
		c.splitReads.Store(true)
	}
	// A generation key outlives every entry stamped with it; if it expires
	// anyway, a new random generation only turns old entries into misses.
	c.genTTL = 2*(o.Policy.TTL+o.Policy.staleWindow()) + o.LeaseTTL
	c.stop, c.cancel = context.WithCancel(context.Background())
	if o.Local != nil {
		if _, ring := rdb.(*redis.Ring); ring {
			return nil, fmt.Errorf("%w: Options.Local does not work on a *redis.Ring: its pub/sub follows the live shards, so the invalidation bus can split without an error; use a Client or ClusterClient", ErrInvalidOptions)
		}
		bus, ok := rdb.(Bus)
		if !ok {
			return nil, fmt.Errorf("%w: Options.Local needs a client with Publish and Subscribe (the Bus interface); %T has not", ErrInvalidOptions, rdb)
		}
		lo, err := o.Local.resolve(o.Name)
		if err != nil {
			return nil, err
		}
		if c.local, err = newLocalTier[T](lo, bus); err != nil {
			return nil, err
		}
		c.wg.Add(1)
		go c.listen()
	}
	if !o.NoReadCoalescing && !c.splitReads.Load() {
		c.reads = newCoalescer()
		c.wg.Add(1)
		go func() {
			defer c.wg.Done()
			c.reads.run(c.stop, c.rdb)
		}()
	}
	warnClientOptions(c.raw, o.Logger, o.Name)
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
func (c *Cache[T]) Stats() Stats {
	s := c.stats.snapshot()
	s.RedisSkipped = c.guard.skipped.Load()
	if l := c.local; l != nil {
		s.LocalFlushes = l.flushes.Load()
		s.BusMessages = l.messages.Load()
	}
	return s
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
//     cache), or an error for a nil load, before any I/O.
//
// Redis failures are not returned under the default FailOpen policy: Get
// falls back to load (at most MaxLoadsWhileDown at a time, else
// ErrOverloaded) and reports the failure to the logger, Recorder and
// OnError. Under FailClosed it returns an error matching
// ErrRedisUnavailable instead. Each Redis command gets Options.OpTimeout,
// and never more than half of what remains of ctx's deadline, so the
// loader keeps time to answer. Undecodable bytes under key count as a miss
// and are overwritten.
//
// Callers that share one load receive the same T, and so do all callers a
// local tier (Options.Local) answers while it holds the value. If T holds
// slices, maps or pointers, treat the result as read-only or copy it; a
// Redis hit decodes a fresh T for each caller.
func (c *Cache[T]) Get(ctx context.Context, key string, load Loader[T]) (T, error) {
	return c.get(ctx, key, load, 0)
}

// maxRejoins bounds how often a Get that joined an in-process load it
// could not trust starts over (see flightSeen.joinable).
const maxRejoins = 1

func (c *Cache[T]) get(ctx context.Context, key string, load Loader[T], attempt int) (T, error) {
	var zero T
	genKey, err := c.checkKey(key)
	if err != nil {
		return zero, err
	}
	if load == nil {
		return zero, errNilLoader
	}
	if c.closed.Load() {
		return zero, ErrClosed
	}
	var snap localSnap
	if l := c.local; l != nil {
		if it, ok := l.lookup(key, c.opts.Clock().UnixNano()); ok {
			c.countLocal(attempt, it.notFound)
			if it.notFound {
				return zero, ErrNotFound
			}
			return it.v, nil
		}
		snap = l.snap(key, genKey)
	}
	// What the in-process load for key (if any) had observed before this
	// Get's read, and how many loads had started: see joinable.
	start := c.flights.Load()
	var seen flightSeen
	if f, ok := c.inflight.Load(key); ok {
		seen = flightSeen{f.(*flightState), f.(*flightState).observing.Load()}
	}
	b, gv, err := c.read(ctx, key, genKey)
	if h := c.hooks; h != nil && h.afterRead != nil {
		h.afterRead(key)
	}
	var vw view[T]
	redisDown := false
	switch {
	case err == nil:
		now := c.opts.Clock()
		vw = c.classify(ctx, key, b, gv, now)
		switch vw.state {
		case stFresh:
			c.count(attempt, outHit)
			c.keepLocal(key, &vw, now, snap)
			if vw.e.Kind == envelope.Value && c.refreshEarly(&vw.e, now) {
				c.refreshAsync(ctx, key, genKey, load, vw.e)
			}
			return vw.v, nil
		case stStale:
			c.count(attempt, outStale)
			if vw.e.Kind == envelope.Value {
				c.refreshAsync(ctx, key, genKey, load, vw.e)
			}
			return vw.v, nil
		case stNotFound:
			c.count(attempt, outNegative)
			c.keepLocal(key, &vw, now, snap)
			return zero, ErrNotFound
		}
		// Absent, being loaded, undecodable, of an older namespace
		// generation, or due for a reload: the shared load sorts it out.
	case isWrongType(err):
		// Not a string: foreign data under our key. acquire.lua replaces it.
		c.corrupt(ctx, key, nil, err)
	default:
		c.count(attempt, outMiss)
		if cerr := ctx.Err(); cerr != nil {
			return zero, cerr // the caller's own deadline, not a Redis failure
		}
		c.redisError(ctx, "get", key, err)
		if c.opts.OnRedisDown == FailClosed {
			return zero, unavailable(err)
		}
		redisDown = true
		return c.shared(ctx, key, genKey, load, vw, redisDown, seen, attempt, start)
	}
	c.count(attempt, outMiss)
	if h := c.hooks; h != nil && h.afterMiss != nil {
		h.afterMiss(key)
	}
	return c.shared(ctx, key, genKey, load, vw, redisDown, seen, attempt, start)
}

var errNilLoader = errors.New("cacheaside: Get with a nil Loader")

// outcome is how a Get's first read went, for Stats and the Recorder.
type outcome uint8

const (
	outHit outcome = iota
	outStale
	outNegative
	outMiss
)

// count records the outcome of a Get's first read; the start-over of the
// same Get (attempt > 0, see shared) is not counted again.
func (c *Cache[T]) count(attempt int, o outcome) {
	if attempt > 0 {
		return
	}
	switch o {
	case outHit:
		c.stats.hits.Add(1)
		c.rec.Hit(c.name)
	case outStale:
		c.stats.hits.Add(1)
		c.rec.Hit(c.name)
		c.stats.staleServed.Add(1)
		c.rec.StaleServed(c.name)
	case outNegative:
		c.stats.negativeHits.Add(1)
		c.rec.NegativeHit(c.name)
	case outMiss:
		c.stats.misses.Add(1)
		c.rec.Miss(c.name)
	}
}

// countLocal counts a Get the local tier answered, as a hit or a
// negative hit.
func (c *Cache[T]) countLocal(attempt int, notFound bool) {
	if attempt > 0 {
		return
	}
	if notFound {
		c.stats.localNegHits.Add(1)
		c.rec.NegativeHit(c.name)
		return
	}
	c.stats.localHits.Add(1)
	c.rec.Hit(c.name)
}

// checkKey validates key and, for a namespaced cache, returns its
// namespace's generation key.
func (c *Cache[T]) checkKey(key string) (genKey string, err error) {
	if err := checkKey(key, c.opts.MaxKeySize); err != nil {
		return "", err
	}
	if !c.opts.Namespaced {
		return "", nil
	}
	genKey, ok := namespaceGenKey(key)
	if !ok {
		return "", fmt.Errorf("%w: %q has no namespace; a namespaced cache takes keys built with Namespace.Key", ErrInvalidKey, key)
	}
	return genKey, nil
}

// read fetches the bytes under key (nil when absent) and, for a namespaced
// cache, the namespace generation, in one round trip.
func (c *Cache[T]) read(ctx context.Context, key, genKey string) (b []byte, gv genView, err error) {
	if c.reads != nil && !c.splitReads.Load() {
		if !c.reads.begin() {
			b, gv, err = c.readCoalesced(ctx, key, genKey)
			if !isCrossSlot(err) {
				return b, gv, err
			}
			c.splitReads.Store(true) // a client that shards: read alone from now on
		} else {
			defer c.reads.end()
		}
	}
	if genKey == "" {
		b, err = c.rdb.Get(ctx, key).Bytes()
		if errors.Is(err, redis.Nil) {
			return nil, gv, nil
		}
		return b, gv, err
	}
	gv.namespaced = true
	vals, err := c.rdb.MGet(ctx, key, genKey).Result()
	if err != nil {
		return nil, gv, err
	}
	if len(vals) != 2 {
		return nil, gv, fmt.Errorf("MGET returned %d values", len(vals))
	}
	b, gv = namespacedRead(vals)
	return b, gv, nil
}

// namespacedRead decodes the reply to MGET of an entry and its namespace
// generation key.
func namespacedRead(vals []any) (b []byte, gv genView) {
	gv.namespaced = true
	if s, ok := vals[0].(string); ok {
		b = []byte(s)
	}
	if s, ok := vals[1].(string); ok && len(s) == envelope.GenSize {
		copy(gv.gen[:], s)
		gv.known = true
	}
	return b, gv
}

// flightState is what an in-process load has observed in Redis, published
// for the Gets that may join it.
type flightState struct {
	observing atomic.Bool                    // it has sent (or is sending) a lease script
	tok       atomic.Pointer[envelope.Token] // token of the entry its answer rests on; nil while a reply is pending
	answer    envelope.Token                 // set by the flight before it returns: the entry holding its answer (zero: none)
	seq       uint64                         // this flight's number in Cache.flights
}

// answer is what a shared load delivers: the value, and the token of the
// Redis entry that holds it (zero when the answer is not in Redis).
type answer[T any] struct {
	v   T
	tok envelope.Token
	fs  *flightState // the flight that produced it
}

// observe marks a lease script about to be sent: until its reply is
// published, nobody can tell whether it ran before or after a write.
func (f *flightState) observe() { f.observing.Store(true); f.tok.Store(nil) }

// flightSeen is the in-process load a Get found before its own read.
type flightSeen struct {
	f         *flightState
	observing bool // f had already sent a lease script
}

// joinable reports whether a Get that found seen before its read, and read
// an entry with token tok (nil: absent or undecodable), may take that
// load's answer without checking it.
//
// A Get must not return a value older than a write whose invalidation
// returned before the Get started, and the invalidation may have come from
// another process, which cannot reach this one's loads. What it can see is
// the key: invalidation deletes it, and tokens never repeat. If the load
// had observed nothing before this Get's read, whatever it observes comes
// later and is fresh enough. If it had, and this Get's read (made after it
// started) shows the entry the load published, no invalidation removed that
// entry before the read, and the load's answer is at least as new. In every
// other case the Get still joins (so a stampede stays one load), but checks
// afterwards that the entry holding the answer is still in Redis, and
// starts over if it is not.
func (s flightSeen) joinable(tok *envelope.Token) bool {
	if s.f == nil || !s.observing {
		return true
	}
	pub := s.f.tok.Load()
	return pub != nil && tok != nil && *pub == *tok
}

// shared runs one load per key in this process and waits for it on ctx.
//
// start is how many flights had begun before the Get's read: a flight
// numbered after it began after the Get did, so whatever it observes is
// recent enough. Only an older flight needs joinable, or the check.
func (c *Cache[T]) shared(ctx context.Context, key, genKey string, load Loader[T], vw view[T], redisDown bool, seen flightSeen, attempt int, start uint64) (T, error) {
	var tok *envelope.Token
	if vw.e.Token != (envelope.Token{}) {
		tok = &vw.e.Token
	}
	trusted := seen.joinable(tok)
	call, leader := c.group.Do(key, func() (answer[T], error) {
		fs := c.startFlight(key)
		defer c.endFlight(key, fs)
		return c.runFlight(ctx, key, genKey, load, vw, redisDown, fs)
	})
	select {
	case <-call.Done():
		a, err := call.Result()
		if leader {
			return a.v, err
		}
		return c.joined(ctx, key, genKey, load, a, err, seen, trusted, redisDown, attempt, start)
	case <-ctx.Done():
		var zero T
		return zero, ctx.Err()
	}
}

// runFlight runs one in-process flight for key and returns its answer. A
// panic anywhere in it (a codec, a hook, a Recorder) would end the process
// on the flight's goroutine; it becomes an error for its callers instead.
// Loader panics are caught closer, in callLoader, where the lease is
// released.
func (c *Cache[T]) runFlight(parent context.Context, key, genKey string, load Loader[T], vw view[T], redisDown bool, fs *flightState) (a answer[T], err error) {
	defer func() {
		if r := recover(); r != nil {
			a, err = answer[T]{fs: fs}, &PanicError{Value: r, Stack: debug.Stack()}
		}
	}()
	v, err := c.run(parent, key, genKey, load, vw, redisDown, fs)
	return answer[T]{v, fs.answer, fs}, err
}

// startFlight publishes the flight that is about to load key.
func (c *Cache[T]) startFlight(key string) *flightState {
	fs := &flightState{seq: c.flights.Add(1)}
	c.inflight.Store(key, fs)
	return fs
}

func (c *Cache[T]) endFlight(key string, fs *flightState) { c.inflight.CompareAndDelete(key, fs) }

// joined is what a Get that joined another caller's flight returns: that
// flight's answer, unless the flight is older than the Get and the entry
// holding its answer is gone from Redis, when the Get starts over once
// (see flightSeen.joinable).
func (c *Cache[T]) joined(ctx context.Context, key, genKey string, load Loader[T], a answer[T], err error, seen flightSeen, trusted, redisDown bool, attempt int, start uint64) (T, error) {
	c.stats.coalesced.Add(1)
	c.rec.Coalesced(c.name)
	// A Get whose own read failed cannot check anything in Redis either,
	// and a start-over would only load again.
	older := a.fs != nil && a.fs.seq <= start && !(a.fs == seen.f && trusted) && !redisDown
	if older && attempt < maxRejoins && (err == nil || errors.Is(err, ErrNotFound)) && !c.holds(ctx, key, genKey, a.tok) {
		return c.get(ctx, key, load, attempt+1)
	}
	return a.v, err
}

// holds reports whether key still holds the entry written under tok, in
// the current namespace generation.
func (c *Cache[T]) holds(ctx context.Context, key, genKey string, tok envelope.Token) bool {
	if tok == (envelope.Token{}) {
		return false
	}
	b, gv, err := c.read(ctx, key, genKey)
	if err != nil || len(b) < envelope.HeaderSize {
		return false
	}
	var e envelope.Entry
	if envelope.Decode(b, &e) != nil || e.Token != tok {
		return false
	}
	return !gv.namespaced || (gv.known && gv.gen == e.Gen)
}

// run is the body of a shared load: take the lease (or wait for whoever
// holds it), call the loader, fill or release. parent is the context of
// the Get that started it; run uses its values, never its cancellation. vw
// is what that Get read.
func (c *Cache[T]) run(parent context.Context, key, genKey string, load Loader[T], vw view[T], redisDown bool, fs *flightState) (v T, err error) {
	var zero T
	if !c.enter() {
		return zero, ErrClosed
	}
	defer c.wg.Done()
	ctx, cancel := context.WithCancel(context.WithoutCancel(parent))
	defer cancel()
	defer context.AfterFunc(c.stop, cancel)()
	defer func() { err = c.closedErr(err) }()

	if redisDown {
		fs.observe() // the loader reads the source now, with no entry to vouch for it
		return c.loadUncached(ctx, load)
	}
	tok := newToken()
	lease := leaseEntry(tok, c.opts.Codec.Format())
	replace := vw.replace
	var (
		waitStart time.Time
		delay     = c.opts.PollMin
		waitCap   = c.opts.LoadTimeout + c.opts.LeaseTTL
	)
	for {
		if vw.state == stReload && vw.e.Kind == envelope.Value {
			// A value due for reload: take the lease on it in place,
			// keeping it to serve if the reload fails.
			fs.observe()
			ok, err := refreshLease(ctx, c.rdb, key, genKey, vw.e.Token, tok, c.opts.LeaseTTL, c.genTTL)
			if ok {
				fs.tok.Store(&tok)
			}
			if err != nil {
				got, err := c.afterRedisError(ctx, "refresh", key, tok, load, err, c.keepOnFailure(&vw.e))
				return c.orStale(got, err, &vw)
			}
			if ok {
				c.waited(waitStart)
				got, stored, err := c.loadAndFill(ctx, key, genKey, vw.e.Gen, load, tok, c.keepOnFailure(&vw.e))
				if stored {
					fs.answer = tok
				}
				return c.orStale(got, err, &vw)
			}
		}
		fs.observe()
		held, gen, cur, err := acquire(ctx, c.rdb, key, genKey, lease, c.opts.LeaseTTL, replace, c.genTTL)
		if err != nil {
			return c.afterRedisError(ctx, "acquire", key, tok, load, err, 0)
		}
		if held {
			fs.tok.Store(&tok)
			c.waited(waitStart)
			got, stored, err := c.loadAndFill(ctx, key, genKey, gen, load, tok, 0)
			if stored {
				fs.answer = tok
			}
			return got, err
		}
		vw = c.classify(ctx, key, cur, genView{namespaced: genKey != "", known: true, gen: gen}, c.opts.Clock())
		replace = vw.replace
		if vw.e.Token != (envelope.Token{}) {
			t := vw.e.Token
			fs.tok.Store(&t)
		}
		switch vw.state {
		case stFresh:
			c.waited(waitStart)
			fs.answer = vw.e.Token
			return vw.v, nil
		case stStale:
			c.waited(waitStart)
			c.stats.staleServed.Add(1)
			c.rec.StaleServed(c.name)
			fs.answer = vw.e.Token
			return vw.v, nil
		case stNotFound:
			c.waited(waitStart)
			fs.answer = vw.e.Token
			return zero, ErrNotFound
		case stMiss:
			continue // undecodable: acquire overwrites it next time
		case stReload:
			if vw.e.Kind == envelope.Value {
				continue // take the lease on it at the top of the loop
			}
		}
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

// closedErr turns the cancellation Close causes into ErrClosed.
func (c *Cache[T]) closedErr(err error) error {
	if err != nil && c.stop.Err() != nil && errors.Is(err, context.Canceled) {
		return ErrClosed
	}
	return err
}

// afterRedisError handles a failed lease script: Close's cancellation is
// returned as is; anything else is reported, the lease the script may have
// taken before its reply was lost is dropped, and the loader answers.
// keep is how long a value the script may have turned into a refreshing
// entry should live on once put back.
func (c *Cache[T]) afterRedisError(ctx context.Context, op, key string, tok envelope.Token, load Loader[T], err error, keep time.Duration) (T, error) {
	if cerr := ctx.Err(); cerr != nil {
		var zero T
		return zero, cerr
	}
	c.redisError(ctx, op, key, err)
	c.releaseLater(key, tok, keep)
	if c.opts.OnRedisDown == FailClosed {
		var zero T
		return zero, unavailable(err)
	}
	return c.loadUncached(ctx, load)
}

// unavailable is the FailClosed error for a Redis failure err.
func unavailable(err error) error {
	if errors.Is(err, ErrRedisUnavailable) {
		return err
	}
	return fmt.Errorf("%w: %w", ErrRedisUnavailable, err)
}

// releaseLater drops tok's lease in the background (best effort, within
// the budget), off the caller's path: a lease script whose reply was lost
// may have taken it, or a fill failed and other processes would otherwise
// wait for it to expire. Close waits for it.
func (c *Cache[T]) releaseLater(key string, tok envelope.Token, keep time.Duration) {
	if !c.enter() {
		return
	}
	go func() {
		defer c.wg.Done()
		ctx, cancel := context.WithTimeout(context.WithoutCancel(c.stop), c.opts.LeaseTTL)
		defer cancel()
		_, _ = release(ctx, c.rdb, key, tok, keep)
	}()
}

func (c *Cache[T]) waited(start time.Time) {
	if !start.IsZero() {
		c.rec.Waited(c.name, time.Since(start))
	}
}

// loadAndFill calls the loader while holding tok's lease and stores the
// outcome: a value, a tombstone, or nothing (the lease is released; a
// refreshing entry goes back to a plain value that lives for keep more).
// stored reports whether the outcome is now in Redis under tok.
func (c *Cache[T]) loadAndFill(ctx context.Context, key, genKey string, gen envelope.Gen, load Loader[T], tok envelope.Token, keep time.Duration) (v T, stored bool, err error) {
	var zero T
	var snap localSnap
	if c.local != nil {
		snap = c.local.snap(key, genKey)
	}
	stopExtend := c.keepLease(ctx, key, tok)
	v, took, err := c.callLoader(ctx, load)
	stopExtend()
	if h := c.hooks; h != nil && h.beforeFill != nil {
		h.beforeFill(key)
	}
	// Fill and release must happen even if Close cancelled ctx.
	wctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), c.opts.LeaseTTL)
	defer cancel()
	p := c.opts.Policy
	if err != nil {
		if !c.isNotFound(err) {
			c.release(wctx, key, tok, keep)
			return zero, false, err
		}
		if p.NoNegativeCache {
			c.release(wctx, key, tok, 0)
			return zero, false, ErrNotFound
		}
		ttl := p.jitter(p.NegativeTTL)
		soft := c.opts.Clock().Add(ttl)
		stored = c.store(wctx, key, genKey, tok, tombstone(tok, c.opts.Codec.Format(), gen, soft), ttl)
		if stored {
			c.putLocal(key, zero, true, soft.UnixMilli(), snap)
		}
		return zero, stored, ErrNotFound
	}
	entry, ttl, merr := c.encode(v, tok, gen, took)
	if merr != nil {
		c.stats.notCached.Add(1)
		c.rec.NotCached(c.name)
		c.report(ctx, "encode", key, merr)
		c.release(wctx, key, tok, keep)
		return v, false, nil
	}
	stored = c.store(wctx, key, genKey, tok, entry, ttl)
	if stored {
		c.putLocal(key, v, false, softExpiry(entry), snap)
	}
	return v, stored, nil
}

// softExpiry reads the soft expiry back from an encoded entry.
func softExpiry(entry []byte) int64 {
	var e envelope.Entry
	if envelope.Decode(entry, &e) != nil {
		return 0
	}
	return e.SoftExpiry
}

// keepLocal stores what a read found (a fresh value or a tombstone) in the
// local tier, if there is one.
func (c *Cache[T]) keepLocal(key string, vw *view[T], now time.Time, snap localSnap) {
	if c.local == nil {
		return
	}
	c.local.put(key, &localItem[T]{v: vw.v, notFound: vw.state == stNotFound, exp: c.local.expiry(now.UnixNano(), vw.e.SoftExpiry)}, snap)
}

// putLocal stores a value (or "not found") this process just filled.
func (c *Cache[T]) putLocal(key string, v T, notFound bool, soft int64, snap localSnap) {
	if c.local == nil {
		return
	}
	c.local.put(key, &localItem[T]{v: v, notFound: notFound, exp: c.local.expiry(c.opts.Clock().UnixNano(), soft)}, snap)
}

// encode builds the value entry for v and the lifetime to give it in
// Redis: the jittered TTL plus the jittered stale window.
func (c *Cache[T]) encode(v T, tok envelope.Token, gen envelope.Gen, took time.Duration) ([]byte, time.Duration, error) {
	payload, err := c.opts.Codec.Marshal(v)
	if err == nil && len(payload) > c.opts.MaxValueSize {
		err = fmt.Errorf("%w: %d bytes, MaxValueSize %d", ErrValueTooLarge, len(payload), c.opts.MaxValueSize)
	}
	if err != nil {
		return nil, 0, err
	}
	p := c.opts.Policy
	ttl := p.jitter(p.TTL)
	life := ttl
	if w := p.staleWindow(); w > 0 {
		life += p.jitter(w)
	}
	return envelope.Encode(&envelope.Entry{
		Kind:       envelope.Value,
		Format:     c.opts.Codec.Format(),
		Token:      tok,
		SoftExpiry: c.opts.Clock().Add(ttl).UnixMilli(),
		LoadMillis: uint32(min(took.Milliseconds(), 1<<32-1)),
		Gen:        gen,
		Payload:    payload,
	}), life, nil
}

// store fills key with entry if tok's lease is still there, and reports
// whether it did.
func (c *Cache[T]) store(ctx context.Context, key, genKey string, tok envelope.Token, entry []byte, ttl time.Duration) bool {
	if h := c.hooks; h != nil && h.noTokenCheck {
		if err := c.rdb.Set(ctx, key, entry, ttl).Err(); err != nil {
			c.redisError(ctx, "fill", key, err)
			return false
		}
		return true
	}
	ok, err := fill(ctx, c.rdb, key, genKey, tok, entry, ttl, c.genTTL)
	switch {
	case err != nil:
		c.redisError(ctx, "fill", key, err)
		c.releaseLater(key, tok, 0) // or other processes wait out the lease
	case !ok:
		c.stats.fillsRejected.Add(1)
		c.rec.FillRejected(c.name)
	}
	return ok && err == nil
}

func (c *Cache[T]) release(ctx context.Context, key string, tok envelope.Token, keep time.Duration) {
	if _, err := release(ctx, c.rdb, key, tok, keep); err != nil {
		c.redisError(ctx, "release", key, err)
	}
}

// keepLease renews tok's lease every LeaseTTL/3 until the returned stop is
// called (it waits for the renewing goroutine to end) or the lease is gone.
func (c *Cache[T]) keepLease(ctx context.Context, key string, tok envelope.Token) (stop func()) {
	return c.renewing(ctx, func(ctx context.Context) bool {
		ok, err := extend(ctx, c.rdb, key, tok, c.opts.LeaseTTL)
		if err != nil {
			if ctx.Err() != nil {
				return false
			}
			c.redisError(ctx, "extend", key, err)
			return true
		}
		return ok // false: revoked, and the fill will be refused too
	})
}

// renewing runs renew every LeaseTTL/3 on its own goroutine, until renew
// returns false or the returned stop is called (stop waits for the
// goroutine to end).
func (c *Cache[T]) renewing(ctx context.Context, renew func(context.Context) bool) (stop func()) {
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
			if !renew(ctx) {
				return
			}
		}
	}()
	return func() { cancel(); <-done }
}

// loadUncached calls the loader without touching Redis, for when Redis
// failed: the caller still gets an answer, within MaxLoadsWhileDown.
func (c *Cache[T]) loadUncached(ctx context.Context, load Loader[T]) (T, error) {
	wctx, cancel := context.WithTimeout(ctx, c.opts.LoadTimeout)
	done, err := c.loadSlot(wctx)
	cancel()
	if err != nil {
		var zero T
		return zero, err
	}
	defer done()
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
	start := c.opts.Clock() // load time feeds XFetch, a freshness decision
	v, err = callFn(ctx, c.opts.LoadTimeout, load)
	took = c.opts.Clock().Sub(start)
	c.loaded(took, err)
	return v, took, err
}

// loaded counts one loader call.
func (c *Cache[T]) loaded(took time.Duration, err error) {
	if err != nil && !c.isNotFound(err) {
		c.stats.loadErrors.Add(1)
	} else {
		c.stats.loads.Add(1)
	}
	c.stats.loadNanos.Add(uint64(took))
	c.rec.Load(c.name, took, err)
}

// callFn is callLoader's guard for any loader: fn on its own goroutine
// under timeout, with panics, Goexit and an ignored context turned into
// errors.
func callFn[R any](ctx context.Context, timeout time.Duration, fn func(context.Context) (R, error)) (R, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	type result struct {
		v   R
		err error
	}
	done := make(chan result, 1)
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
		v, err := fn(ctx)
		normal = true
		done <- result{v, err}
	}()
	select {
	case r := <-done:
		return r.v, r.err
	case <-ctx.Done():
		var zero R
		return zero, fmt.Errorf("cacheaside: loader did not return within its context: %w", ctx.Err())
	}
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
	genKey, err := c.checkKey(key)
	if err != nil {
		return err
	}
	if c.closed.Load() {
		return ErrClosed
	}
	entry, ttl, err := c.encode(v, newToken(), envelope.Gen{}, 0)
	if err != nil {
		c.stats.notCached.Add(1)
		c.rec.NotCached(c.name)
		operr := c.report(ctx, "encode", key, err)
		if derr := c.Invalidate(ctx, key); derr != nil {
			return errors.Join(operr, derr)
		}
		return operr
	}
	// A Get that starts after Set returns must not join a load that began
	// before it: that load's value predates v.
	c.group.Forget(key)
	if genKey != "" {
		err = setInNamespace(ctx, c.rdb, key, genKey, entry, ttl, c.genTTL)
	} else {
		err = c.rdb.Set(ctx, key, entry, ttl).Err()
	}
	c.group.Forget(key) // again: a load that started before the SET landed
	if err != nil {
		return errors.Join(c.redisError(ctx, "set", key, err), c.invalidated(ctx, []string{key}))
	}
	return c.invalidated(ctx, []string{key})
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

// redisError counts a failed Redis command and reports it. A command the
// open breaker did not send is counted and passed to the Recorder and
// OnError, but logged only at debug level: the breaker logged its opening,
// and an outage must not flood the log with a line per request.
func (c *Cache[T]) redisError(ctx context.Context, op, key string, err error) error {
	c.stats.redisErrors.Add(1)
	c.rec.RedisError(c.name, op, err)
	if errors.Is(err, ErrRedisUnavailable) {
		e := &OpError{Cache: c.name, Op: op, Key: key, Err: err}
		c.opts.Logger.LogAttrs(ctx, slog.LevelDebug, "cacheaside: Redis skipped", slog.String("cache", c.name), slog.String("op", op))
		if c.opts.OnError != nil {
			c.opts.OnError(ctx, e)
		}
		return e
	}
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
	afterRead    func(key string) // after the first read returned
	afterMiss    func(key string) // after the first read missed, before the shared load
	beforeFill   func(key string) // after the loader returned, before the fill
	noTokenCheck bool             // fill with a plain SET (a broken protocol, for control tests)
	noExtend     bool             // do not renew leases
}
