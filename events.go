// Events: the Recorder, Stats and the counters behind them.

package cacheaside

import (
	"context"
	"errors"
	"log/slog"
	"sync/atomic"
	"time"
)

// Recorder receives every event a Cache counts, for export to a metrics
// system (the reference app has a Prometheus adapter). cache is
// Options.Name; raw keys are never passed, so labels stay low-cardinality.
// Methods are called on the request path and must be fast and safe for
// concurrent use. Embed NopRecorder to implement only some of them.
type Recorder interface {
	// Hit: the first read found a value.
	Hit(cache string)
	// NegativeHit: the first read found a "not found" tombstone.
	NegativeHit(cache string)
	// Miss: the first read found no usable entry (absent, being loaded,
	// corrupt, or Redis failed).
	Miss(cache string)
	// Load: the loader returned after d with err: nil, the loader's own
	// error as returned (including its "not found" error, before mapping to
	// ErrNotFound), a *PanicError, or a timeout.
	Load(cache string, d time.Duration, err error)
	// Coalesced: this Get shared an in-process load started by another Get.
	Coalesced(cache string)
	// LeaseContended: another caller (usually another process) held the
	// lease, so this Get waited for its fill instead of loading.
	LeaseContended(cache string)
	// Waited: a wait for another holder's fill ended after d.
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
	// RedisError: a Redis command failed. op names the step ("get",
	// "acquire", "fill", ...).
	RedisError(cache, op string, err error)
	// StaleServed: a value past its TTL was returned, inside the
	// stale-while-revalidate window or because a reload failed inside the
	// stale-if-error window.
	StaleServed(cache string)
	// Refresh: a background refresh (early or stale-while-revalidate)
	// ended with err (nil, ErrNotFound, or the failure).
	Refresh(cache string, err error)
	// BreakerState: the Redis circuit breaker moved to state ("closed",
	// "open" or "half-open").
	BreakerState(cache, state string)
	// Invalidated: n keys were deleted by Invalidate or InvalidatePrefix,
	// or a namespace was bumped (n = 1).
	Invalidated(cache string, n int)
}

// NopRecorder does nothing. It is the default Recorder, and embedding it
// lets a type implement only the Recorder methods it cares about.
type NopRecorder struct{}

func (NopRecorder) Hit(string)                        {}
func (NopRecorder) NegativeHit(string)                {}
func (NopRecorder) Miss(string)                       {}
func (NopRecorder) Load(string, time.Duration, error) {}
func (NopRecorder) Coalesced(string)                  {}
func (NopRecorder) LeaseContended(string)             {}
func (NopRecorder) Waited(string, time.Duration)      {}
func (NopRecorder) FillRejected(string)               {}
func (NopRecorder) NotCached(string)                  {}
func (NopRecorder) DecodeError(string)                {}
func (NopRecorder) RedisError(string, string, error)  {}
func (NopRecorder) StaleServed(string)                {}
func (NopRecorder) Refresh(string, error)             {}
func (NopRecorder) BreakerState(string, string)       {}
func (NopRecorder) Invalidated(string, int)           {}

var _ Recorder = NopRecorder{}

// Stats is a snapshot of one Cache's counters since New, returned by
// Cache.Stats. Every Get counts exactly once as a Hit, NegativeHit or Miss.
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
	LeaseContended uint64        // loads that waited for another holder's fill
	FillsRejected  uint64        // fills refused because the lease was gone
	NotCached      uint64        // values returned but too large or unencodable to cache
	DecodeErrors   uint64        // entries that could not be decoded
	RedisErrors    uint64        // failed Redis commands
	StaleServed    uint64        // Gets answered with a value past its TTL, inside the stale-while-revalidate window (counted in Hits too)
	StaleIfError   uint64        // Gets answered with the old value because its reload failed
	Refreshes      uint64        // background refreshes that ran their loader
	RefreshErrors  uint64        // of those, the ones that failed
	Invalidations  uint64        // keys deleted by Invalidate and InvalidatePrefix
	NamespaceBumps uint64        // InvalidateNamespace calls that succeeded
	BreakerOpens   uint64        // times the Redis circuit breaker opened
	RedisSkipped   uint64        // Redis commands not sent because the breaker was open
	Overloaded     uint64        // Gets refused with ErrOverloaded
	RetriedInvals  uint64        // failed invalidations applied later by RetryInvalidations
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

// counters are the live values behind Stats.
type counters struct {
	hits, negativeHits, misses        atomic.Uint64
	localHits, localNegHits           atomic.Uint64
	loads, loadErrors, loadNanos      atomic.Uint64
	coalesced, leaseContended         atomic.Uint64
	fillsRejected, notCached          atomic.Uint64
	decodeErrors, redisErrors, invals atomic.Uint64
	staleServed, staleIfError         atomic.Uint64
	refreshes, refreshErrors, bumps   atomic.Uint64
	breakerOpens, overloaded          atomic.Uint64
	retriedInvals, droppedInvals      atomic.Uint64
}

func (c *counters) snapshot() Stats {
	return Stats{
		Hits:           c.hits.Load() + c.localHits.Load(),
		LocalHits:      c.localHits.Load() + c.localNegHits.Load(),
		NegativeHits:   c.negativeHits.Load() + c.localNegHits.Load(),
		Misses:         c.misses.Load(),
		Loads:          c.loads.Load(),
		LoadErrors:     c.loadErrors.Load(),
		LoadTime:       time.Duration(c.loadNanos.Load()),
		Coalesced:      c.coalesced.Load(),
		LeaseContended: c.leaseContended.Load(),
		FillsRejected:  c.fillsRejected.Load(),
		NotCached:      c.notCached.Load(),
		DecodeErrors:   c.decodeErrors.Load(),
		RedisErrors:    c.redisErrors.Load(),
		StaleServed:    c.staleServed.Load(),
		StaleIfError:   c.staleIfError.Load(),
		Refreshes:      c.refreshes.Load(),
		RefreshErrors:  c.refreshErrors.Load(),
		Invalidations:  c.invals.Load(),
		NamespaceBumps: c.bumps.Load(),
		BreakerOpens:   c.breakerOpens.Load(),
		Overloaded:     c.overloaded.Load(),
		RetriedInvals:  c.retriedInvals.Load(),
		DroppedInvals:  c.droppedInvals.Load(),
	}
}

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
