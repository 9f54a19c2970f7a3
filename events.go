// Events: the Recorder, Stats and the counters behind them.

package cacheaside

import (
	"context"
	"errors"
	"log/slog"
	"math/rand/v2"
	"runtime"
	"sync"
	"sync/atomic"
	"time"
)

// Recorder receives every event a Cache counts, for export to a metrics
// system (the reference app has a Prometheus adapter). cache is
// Options.Name; raw keys are never passed, so labels stay low-cardinality.
// Methods are called on the request path and must be fast and safe for
// concurrent use. Embed NopRecorder to implement only some of them.
//
// Every field of Stats has its Recorder method, called from the same place
// that counts it, so the two never disagree; the exceptions are derived:
// Loads, LoadErrors and LoadTime come from Load, Refreshes and
// RefreshErrors from Refresh, BreakerOpens from BreakerState("open"), and
// PendingInvals is a gauge (queued less retried and dropped).
type Recorder interface {
	// Hit: the first read found a value (in Redis, or in the local tier,
	// when LocalHit follows).
	Hit(cache string)
	// NegativeHit: the first read found a "not found" tombstone (in Redis,
	// or in the local tier, when LocalHit follows).
	NegativeHit(cache string)
	// LocalHit: the local tier answered a Get (after Hit or NegativeHit).
	LocalHit(cache string)
	// Miss: the first read found no usable entry (absent, being loaded,
	// corrupt, or Redis failed).
	Miss(cache string)
	// Load: the loader returned after d with err: nil, the loader's own
	// error as returned (including its "not found" error, before mapping to
	// ErrNotFound), a *PanicError, or a timeout. A GetMany's batch loader
	// counts as one load.
	Load(cache string, d time.Duration, err error)
	// Coalesced: this Get shared an in-process load started by another Get.
	Coalesced(cache string)
	// LeaseContended: keys that another caller (usually another process)
	// held the lease on, so this Get or GetMany waited for their fills
	// instead of loading them.
	LeaseContended(cache string, keys int)
	// Waited: a wait for other holders' fills ended after d.
	Waited(cache string, d time.Duration)
	// FillRejected: a fill found its lease gone (invalidated, overwritten
	// or expired and re-taken) and wrote nothing.
	FillRejected(cache string)
	// NotCached: a loaded value was returned but not cached because it
	// encoded to more than Options.MaxValueSize or could not be encoded.
	NotCached(cache string)
	// DecodeError: the bytes under a key could not be decoded; the key is
	// treated as a miss and overwritten.
	DecodeError(cache string)
	// RedisError: a Redis command failed, or was not sent because the
	// breaker is open (err matches ErrRedisUnavailable). op names the step
	// ("get", "acquire", "fill", ...).
	RedisError(cache, op string, err error)
	// RedisSkipped: the open breaker kept a command from being sent.
	RedisSkipped(cache string)
	// StaleServed: a value past its TTL was returned from inside the
	// stale-while-revalidate window.
	StaleServed(cache string)
	// StaleIfError: a value past its TTL was returned because its reload
	// failed inside the stale-if-error window.
	StaleIfError(cache string)
	// Refresh: a background refresh (early or stale-while-revalidate)
	// ended with err (nil, ErrNotFound, or the failure).
	Refresh(cache string, err error)
	// BreakerState: the Redis circuit breaker moved to state ("closed",
	// "open" or "half-open").
	BreakerState(cache, state string)
	// Invalidated: n keys were deleted by Invalidate or InvalidatePrefix.
	Invalidated(cache string, n int)
	// NamespaceBumped: InvalidateNamespace gave a namespace a new
	// generation.
	NamespaceBumped(cache string)
	// InvalidationQueued: an invalidation failed and was queued for retry
	// (see Degradation.RetryInvalidations).
	InvalidationQueued(cache string)
	// InvalidationRetried: a failed invalidation was applied by a retry.
	InvalidationRetried(cache string)
	// InvalidationDropped: a failed invalidation was given up (too old, or
	// the retry queue was full).
	InvalidationDropped(cache string)
	// Overloaded: a Get was refused with ErrOverloaded.
	Overloaded(cache string)
	// LocalFlushed: the local tier was emptied (bus lost or regained, an
	// unreadable message).
	LocalFlushed(cache string)
	// BusMessage: an invalidation message arrived from the bus.
	BusMessage(cache string)
}

// NopRecorder does nothing. It is the default Recorder, and embedding it
// lets a type implement only the Recorder methods it cares about.
type NopRecorder struct{}

func (NopRecorder) Hit(string)                        {}
func (NopRecorder) NegativeHit(string)                {}
func (NopRecorder) LocalHit(string)                   {}
func (NopRecorder) Miss(string)                       {}
func (NopRecorder) Load(string, time.Duration, error) {}
func (NopRecorder) Coalesced(string)                  {}
func (NopRecorder) LeaseContended(string, int)        {}
func (NopRecorder) Waited(string, time.Duration)      {}
func (NopRecorder) FillRejected(string)               {}
func (NopRecorder) NotCached(string)                  {}
func (NopRecorder) DecodeError(string)                {}
func (NopRecorder) RedisError(string, string, error)  {}
func (NopRecorder) RedisSkipped(string)               {}
func (NopRecorder) StaleServed(string)                {}
func (NopRecorder) StaleIfError(string)               {}
func (NopRecorder) Refresh(string, error)             {}
func (NopRecorder) BreakerState(string, string)       {}
func (NopRecorder) Invalidated(string, int)           {}
func (NopRecorder) NamespaceBumped(string)            {}
func (NopRecorder) InvalidationQueued(string)         {}
func (NopRecorder) InvalidationRetried(string)        {}
func (NopRecorder) InvalidationDropped(string)        {}
func (NopRecorder) Overloaded(string)                 {}
func (NopRecorder) LocalFlushed(string)               {}
func (NopRecorder) BusMessage(string)                 {}

var _ Recorder = NopRecorder{}

// Stats is a snapshot of one Cache's counters since New, returned by
// Cache.Stats. Every Get counts exactly once as a Hit, NegativeHit or
// Miss; a GetMany counts once per distinct key.
type Stats struct {
	Hits           uint64        // first read found a value (in Redis or, with a local tier, in memory)
	LocalHits      uint64        // Hits and NegativeHits the local tier answered
	LocalFlushes   uint64        // times the local tier was emptied (bus lost or regained, unreadable message)
	BusMessages    uint64        // invalidation messages received from the bus
	NegativeHits   uint64        // first read found a "not found" tombstone
	Misses         uint64        // first read found nothing usable
	Loads          uint64        // loader calls that returned a value or ErrNotFound
	LoadErrors     uint64        // loader calls that failed (errors, panics, timeouts)
	LoadTime       time.Duration // total time spent in the loader
	Coalesced      uint64        // Gets that shared another Get's in-process load
	LeaseContended uint64        // keys whose load waited for another holder's fill
	FillsRejected  uint64        // fills refused because the lease was gone
	NotCached      uint64        // values returned but too large or unencodable to cache
	DecodeErrors   uint64        // entries that could not be decoded
	RedisErrors    uint64        // failed Redis commands, and commands the open breaker skipped
	StaleServed    uint64        // answers with a value past its TTL, inside the stale-while-revalidate window (a first read's counts in Hits too)
	StaleIfError   uint64        // answers with the old value because its reload failed
	Refreshes      uint64        // background refreshes that ran their loader
	RefreshErrors  uint64        // of those, the ones that failed
	Invalidations  uint64        // keys deleted by Invalidate and InvalidatePrefix
	NamespaceBumps uint64        // InvalidateNamespace calls that succeeded
	BreakerOpens   uint64        // times the Redis circuit breaker opened
	RedisSkipped   uint64        // Redis commands not sent because the breaker was open
	Overloaded     uint64        // Gets refused with ErrOverloaded
	QueuedInvals   uint64        // failed invalidations queued for retry
	PendingInvals  uint64        // of those, the ones still waiting now (a gauge; this process's Gets of their keys load from the source)
	RetriedInvals  uint64        // failed invalidations applied later by a retry
	DroppedInvals  uint64        // failed invalidations given up (too old, or the queue was full)
}

// Requests is the number of Gets counted: Hits + NegativeHits + Misses.
func (s Stats) Requests() uint64 { return s.Hits + s.NegativeHits + s.Misses }

// HitRate is the fraction of Gets answered from Redis without a load, in
// [0, 1]; tombstone hits count as hits because they spared the loader too.
// It is 0 before the first Get.
func (s Stats) HitRate() float64 {
	n := s.Requests()
	if n == 0 {
		return 0
	}
	return float64(s.Hits+s.NegativeHits) / float64(n)
}

// stat names one of the counters behind Stats.
type stat uint8

const (
	nHits stat = iota // Redis hits, stale ones included
	nLocalHits
	nLocalNegHits
	nNegHits // Redis tombstone hits
	nMisses
	nLoads
	nLoadErrors
	nLoadNanos
	nCoalesced
	nLeaseContended
	nFillsRejected
	nNotCached
	nDecodeErrors
	nRedisErrors
	nRedisSkipped
	nStaleServed
	nStaleIfError
	nRefreshes
	nRefreshErrors
	nInvals
	nBumps
	nBreakerOpens
	nOverloaded
	nQueuedInvals
	nRetriedInvals
	nDroppedInvals
	nLocalFlushes
	nBusMessages
	numCounters
)

// stripe is one copy of every counter. Each core updates its own stripe
// (see add), so cores rarely write the same cache line; the padding keeps
// neighbouring stripes off each other's lines.
type stripe struct {
	n [numCounters]atomic.Uint64
	_ [64]byte
}

// events is the one sink every counted event goes through: it updates the
// counters behind Stats and calls the Recorder, in one place.
type events struct {
	name    string
	rec     Recorder
	nop     bool // rec is the NopRecorder: skip the calls
	stripes []stripe
	mask    uint32
}

func newEvents(name string, rec Recorder) *events {
	n := 1
	for n < 4*runtime.GOMAXPROCS(0) && n < 64 {
		n *= 2
	}
	_, nop := rec.(NopRecorder)
	return &events{name: name, rec: rec, nop: nop, stripes: make([]stripe, n), mask: uint32(n - 1)}
}

// add adds n to counter i in the stripe of the caller's token. Tokens
// live in a sync.Pool, whose per-P caches give each core a stripe of its
// own; a failed compare-and-swap (another core on the same stripe) moves
// the token to another stripe, as Java's LongAdder does. A random stripe
// per update would not do: half the updates would find their line last
// written by the other core.
func (e *events) add(i stat, n uint64) {
	t, _ := stripeTokens.Get().(*stripeToken)
	if t == nil {
		t = &stripeToken{idx: rand.Uint32()}
	}
	for {
		c := &e.stripes[t.idx&e.mask].n[i]
		v := c.Load()
		if c.CompareAndSwap(v, v+n) {
			break
		}
		t.idx = rand.Uint32()
	}
	stripeTokens.Put(t)
}

// stripeToken is a core's current stripe index, shared by every cache.
type stripeToken struct {
	idx uint32
	_   [60]byte
}

var stripeTokens sync.Pool

func (e *events) snapshot() Stats {
	var n [numCounters]uint64
	for j := range e.stripes {
		for i := range n {
			n[i] += e.stripes[j].n[i].Load()
		}
	}
	return Stats{
		Hits:           n[nHits] + n[nLocalHits],
		LocalHits:      n[nLocalHits] + n[nLocalNegHits],
		LocalFlushes:   n[nLocalFlushes],
		BusMessages:    n[nBusMessages],
		NegativeHits:   n[nNegHits] + n[nLocalNegHits],
		Misses:         n[nMisses],
		Loads:          n[nLoads],
		LoadErrors:     n[nLoadErrors],
		LoadTime:       time.Duration(n[nLoadNanos]),
		Coalesced:      n[nCoalesced],
		LeaseContended: n[nLeaseContended],
		FillsRejected:  n[nFillsRejected],
		NotCached:      n[nNotCached],
		DecodeErrors:   n[nDecodeErrors],
		RedisErrors:    n[nRedisErrors],
		StaleServed:    n[nStaleServed],
		StaleIfError:   n[nStaleIfError],
		Refreshes:      n[nRefreshes],
		RefreshErrors:  n[nRefreshErrors],
		Invalidations:  n[nInvals],
		NamespaceBumps: n[nBumps],
		BreakerOpens:   n[nBreakerOpens],
		RedisSkipped:   n[nRedisSkipped],
		Overloaded:     n[nOverloaded],
		QueuedInvals:   n[nQueuedInvals],
		RetriedInvals:  n[nRetriedInvals],
		DroppedInvals:  n[nDroppedInvals],
	}
}

// The events, each counted and recorded here and nowhere else.

func (e *events) hit() {
	e.add(nHits, 1)
	if !e.nop {
		e.rec.Hit(e.name)
	}
}

func (e *events) staleHit() {
	e.add(nHits, 1)
	e.add(nStaleServed, 1)
	if !e.nop {
		e.rec.Hit(e.name)
		e.rec.StaleServed(e.name)
	}
}

func (e *events) negativeHit() {
	e.add(nNegHits, 1)
	if !e.nop {
		e.rec.NegativeHit(e.name)
	}
}

func (e *events) localHit(notFound bool) {
	if notFound {
		e.add(nLocalNegHits, 1)
	} else {
		e.add(nLocalHits, 1)
	}
	if e.nop {
		return
	}
	if notFound {
		e.rec.NegativeHit(e.name)
	} else {
		e.rec.Hit(e.name)
	}
	e.rec.LocalHit(e.name)
}

func (e *events) miss() {
	e.add(nMisses, 1)
	if !e.nop {
		e.rec.Miss(e.name)
	}
}

// loaded counts one loader call; notFound says err means "does not exist".
func (e *events) loaded(took time.Duration, err error, notFound bool) {
	if err != nil && !notFound {
		e.add(nLoadErrors, 1)
	} else {
		e.add(nLoads, 1)
	}
	e.add(nLoadNanos, uint64(took))
	e.rec.Load(e.name, took, err)
}

func (e *events) coalesced() { e.add(nCoalesced, 1); e.rec.Coalesced(e.name) }

func (e *events) leaseContended(keys int) {
	e.add(nLeaseContended, uint64(keys))
	e.rec.LeaseContended(e.name, keys)
}

func (e *events) waited(d time.Duration) { e.rec.Waited(e.name, d) }
func (e *events) fillRejected()          { e.add(nFillsRejected, 1); e.rec.FillRejected(e.name) }
func (e *events) notCached()             { e.add(nNotCached, 1); e.rec.NotCached(e.name) }
func (e *events) decodeError()           { e.add(nDecodeErrors, 1); e.rec.DecodeError(e.name) }
func (e *events) staleServed()           { e.add(nStaleServed, 1); e.rec.StaleServed(e.name) }
func (e *events) staleIfError()          { e.add(nStaleIfError, 1); e.rec.StaleIfError(e.name) }

func (e *events) redisError(op string, err error) {
	e.add(nRedisErrors, 1)
	e.rec.RedisError(e.name, op, err)
}

func (e *events) redisSkipped() { e.add(nRedisSkipped, 1); e.rec.RedisSkipped(e.name) }

func (e *events) refreshed(err error, failed bool) {
	e.add(nRefreshes, 1)
	if failed {
		e.add(nRefreshErrors, 1)
	}
	e.rec.Refresh(e.name, err)
}

func (e *events) breakerState(state string, open bool) {
	if open {
		e.add(nBreakerOpens, 1)
	}
	e.rec.BreakerState(e.name, state)
}

func (e *events) invalidated(n int64) {
	if n > 0 {
		e.add(nInvals, uint64(n))
		e.rec.Invalidated(e.name, int(n))
	}
}

func (e *events) bumped()       { e.add(nBumps, 1); e.rec.NamespaceBumped(e.name) }
func (e *events) queued()       { e.add(nQueuedInvals, 1); e.rec.InvalidationQueued(e.name) }
func (e *events) retried()      { e.add(nRetriedInvals, 1); e.rec.InvalidationRetried(e.name) }
func (e *events) dropped()      { e.add(nDroppedInvals, 1); e.rec.InvalidationDropped(e.name) }
func (e *events) overloaded()   { e.add(nOverloaded, 1); e.rec.Overloaded(e.name) }
func (e *events) localFlushed() { e.add(nLocalFlushes, 1); e.rec.LocalFlushed(e.name) }
func (e *events) busMessage()   { e.add(nBusMessages, 1); e.rec.BusMessage(e.name) }

// redisError counts a failed Redis command and reports it. A command the
// open breaker did not send is counted and passed to the Recorder and
// OnError, but logged only at debug level: the breaker logged its opening.
func (c *Cache[T]) redisError(ctx context.Context, op, key string, err error) error {
	c.ev.redisError(op, err)
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

// report sends err to OnError and, within the log gate (logs.go), to the
// logger, and returns it as an *OpError.
func (c *Cache[T]) report(ctx context.Context, op, key string, err error) error {
	e := &OpError{Cache: c.name, Op: op, Key: key, Err: err}
	log, summary, since := c.logs.admit(op, time.Now())
	logSummary(ctx, c.opts.Logger, c.name, "errors suppressed without a log line", summary, since)
	if log {
		c.opts.Logger.LogAttrs(ctx, slog.LevelWarn, "cacheaside: suppressed error",
			slog.String("cache", c.name), slog.String("op", op), slog.String("key", key), slog.Any("err", err))
	}
	if c.opts.OnError != nil {
		c.opts.OnError(ctx, e)
	}
	return e
}

// errorOnce gathers the failures of the commands of one round trip, which
// usually share one cause, to report them once rather than once per key.
type errorOnce struct {
	keys  []string
	first error
}

func (e *errorOnce) add(key string, err error) {
	if e.first == nil {
		e.first = err
	}
	e.keys = append(e.keys, key)
}

// report counts and reports the first failure, labelled with every key
// that failed.
func (e *errorOnce) report(ctx context.Context, c interface {
	redisError(context.Context, string, string, error) error
}, op string) {
	if e.first != nil {
		c.redisError(ctx, op, keysLabel(e.keys), e.first)
	}
}
