// Events: the counters behind Stats (metrics.go), and the one sink that
// counts, records and traces each event.

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
	nSoftTimeouts
	nUnchanged
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
	nStarved
	nLoadsWithin // numLoadBuckets counters, one per bucket (not cumulative)
	numCounters  = nLoadsWithin + numLoadBuckets
)

// stripe is one copy of every counter. Each core updates its own stripe
// (see add), so cores rarely write the same cache line; the padding keeps
// neighbouring stripes off each other's lines.
type stripe struct {
	n [numCounters]atomic.Uint64
	_ [64]byte
}

// events is the one sink every counted event goes through: it updates the
// counters behind Stats and tells the Recorder and the Tracer, in one place.
type events struct {
	name    string
	rec     Recorder // nil: none
	tr      Tracer   // nil: no tracing
	stripes []stripe
	mask    uint32
}

func newEvents(name string, rec Recorder, tr Tracer) *events {
	n := 1
	for n < 4*runtime.GOMAXPROCS(0) && n < 64 {
		n *= 2
	}
	return &events{name: name, rec: rec, tr: tr, stripes: make([]stripe, n), mask: uint32(n - 1)}
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
	within := make([]LoadBucket, numLoadBuckets)
	var sum uint64
	for i := range within {
		sum += n[nLoadsWithin+stat(i)]
		within[i] = LoadBucket{Le: loadBounds[i], Count: sum}
	}
	return Stats{
		Hits:              n[nHits] + n[nLocalHits],
		LocalHits:         n[nLocalHits],
		NegativeHits:      n[nNegHits] + n[nLocalNegHits],
		LocalNegativeHits: n[nLocalNegHits],
		LoadsWithin:       within,
		LocalFlushes:      n[nLocalFlushes],
		BusMessages:       n[nBusMessages],
		Misses:            n[nMisses],
		Loads:             n[nLoads],
		LoadErrors:        n[nLoadErrors],
		LoadTime:          time.Duration(n[nLoadNanos]),
		Coalesced:         n[nCoalesced],
		LeaseContended:    n[nLeaseContended],
		FillsRejected:     n[nFillsRejected],
		NotCached:         n[nNotCached],
		DecodeErrors:      n[nDecodeErrors],
		RedisErrors:       n[nRedisErrors],
		StaleServed:       n[nStaleServed],
		StaleIfError:      n[nStaleIfError],
		SoftTimeouts:      n[nSoftTimeouts],
		Unchanged:         n[nUnchanged],
		Refreshes:         n[nRefreshes],
		RefreshErrors:     n[nRefreshErrors],
		Invalidations:     n[nInvals],
		NamespaceBumps:    n[nBumps],
		BreakerOpens:      n[nBreakerOpens],
		RedisSkipped:      n[nRedisSkipped],
		Overloaded:        n[nOverloaded],
		QueuedInvals:      n[nQueuedInvals],
		RetriedInvals:     n[nRetriedInvals],
		DroppedInvals:     n[nDroppedInvals],
		Starved:           n[nStarved],
	}
}

// The events, each counted, recorded and traced here and nowhere else.

// record tells the Recorder of ev, if there is one.
func (e *events) record(ctx context.Context, ev Event) {
	if e.rec != nil {
		ev.Cache = e.name
		e.rec.Record(ctx, ev)
	}
}

// trace passes ev to the Tracer, if there is one, with the context of the
// call it belongs to.
func (e *events) trace(ctx context.Context, ev Event) {
	if e.tr != nil && ctx.Value(backgroundKey{}) == nil {
		ev.Cache = e.name
		e.tr.Event(ctx, ev)
	}
}

// tell is record and trace: an event inside a call.
func (e *events) tell(ctx context.Context, ev Event) {
	if e.rec != nil || e.tr != nil {
		e.record(ctx, ev)
		e.trace(ctx, ev)
	}
}

// inCall counts an event inside a call that is only its kind (the hit
// path's among them): with no Recorder and no Tracer it builds nothing.
func (e *events) inCall(ctx context.Context, i stat, kind string) {
	e.add(i, 1)
	if e.rec != nil || e.tr != nil {
		e.tell(ctx, Event{Kind: kind})
	}
}

// backgroundKey marks the context of a background refresh: its events
// are not its Get's (see Tracer).
type backgroundKey struct{}

func (e *events) hit(ctx context.Context)         { e.inCall(ctx, nHits, evHit) }
func (e *events) negativeHit(ctx context.Context) { e.inCall(ctx, nNegHits, evNegativeHit) }
func (e *events) miss(ctx context.Context)        { e.inCall(ctx, nMisses, evMiss) }

func (e *events) staleHit(ctx context.Context) {
	e.add(nHits, 1)
	e.inCall(ctx, nStaleServed, evStale)
}

func (e *events) localHit(ctx context.Context, notFound bool) {
	if notFound {
		e.inCall(ctx, nLocalNegHits, evLocalNegativeHit)
		return
	}
	e.inCall(ctx, nLocalHits, evLocalHit)
}

// loaded counts one loader call; notFound says err means "does not exist".
func (e *events) loaded(ctx context.Context, took time.Duration, err error, notFound bool) {
	if err != nil && !notFound {
		e.add(nLoadErrors, 1)
	} else {
		e.add(nLoads, 1)
	}
	e.add(nLoadNanos, uint64(took))
	if b := loadBucket(took); b < numLoadBuckets {
		e.add(nLoadsWithin+b, 1)
	}
	e.record(ctx, Event{Kind: evLoad, D: took, Err: err})
}

func (e *events) coalesced(ctx context.Context) { e.inCall(ctx, nCoalesced, evCoalesced) }

func (e *events) leaseContended(ctx context.Context, keys int) {
	e.add(nLeaseContended, uint64(keys))
	e.tell(ctx, Event{Kind: evLeaseWait, N: keys})
}

func (e *events) waited(d time.Duration) { e.record(context.Background(), Event{Kind: evWaited, D: d}) }

func (e *events) fillRejected(ctx context.Context) { e.inCall(ctx, nFillsRejected, evFillRejected) }

func (e *events) notCached(ctx context.Context) { e.inCall(ctx, nNotCached, evNotCached) }

func (e *events) decodeError(ctx context.Context) { e.inCall(ctx, nDecodeErrors, evDecodeError) }

func (e *events) staleServed(ctx context.Context) { e.inCall(ctx, nStaleServed, evServedStale) }

func (e *events) staleIfError(ctx context.Context) { e.inCall(ctx, nStaleIfError, evStaleIfError) }

func (e *events) softTimeout(ctx context.Context) { e.inCall(ctx, nSoftTimeouts, evSoftTimeout) }

func (e *events) unchanged(ctx context.Context) { e.inCall(ctx, nUnchanged, evUnchanged) }

// redisError counts a command that was sent and failed; a command that was
// not sent (err matches ErrRedisUnavailable) was counted as skipped where
// it was refused, and only reaches the Tracer here. A command whose reply
// this process read late (errStarved) is not a Redis failure: it counts in
// Starved.
func (e *events) redisError(ctx context.Context, op string, err error) {
	if starved(err) {
		e.add(nStarved, 1)
		e.tell(ctx, Event{Kind: evStarved, Op: op, Err: err})
		return
	}
	if errors.Is(err, ErrRedisUnavailable) {
		e.trace(ctx, Event{Kind: evRedisSkipped, Op: op, Err: err})
		return
	}
	e.add(nRedisErrors, 1)
	e.tell(ctx, Event{Kind: evRedisError, Op: op, Err: err})
}

// redisSkipped counts a command the guard did not send.
func (e *events) redisSkipped() {
	e.add(nRedisSkipped, 1)
	e.record(context.Background(), Event{Kind: evRedisSkipped})
}

func (e *events) refreshed(err error, failed bool) {
	e.add(nRefreshes, 1)
	if failed {
		e.add(nRefreshErrors, 1)
	}
	e.record(context.Background(), Event{Kind: evRefresh, Err: err})
}

// breakerState is told of each change of a breaker: open says it opened;
// state is the worst state of all the cache's breakers, reported to the
// Recorder when changed says it moved.
func (e *events) breakerState(state string, open, changed bool) {
	if open {
		e.add(nBreakerOpens, 1)
	}
	if changed {
		e.record(context.Background(), Event{Kind: evBreakerState, State: state})
	}
}

func (e *events) invalidated(n int64) {
	if n > 0 {
		e.add(nInvals, uint64(n))
		e.record(context.Background(), Event{Kind: evInvalidated, N: int(n)})
	}
}

// background counts an event of the cache's own work, which no call waits
// for.
func (e *events) background(i stat, kind string) {
	e.add(i, 1)
	e.record(context.Background(), Event{Kind: kind})
}

func (e *events) bumped()       { e.background(nBumps, evNamespaceBumped) }
func (e *events) queued()       { e.background(nQueuedInvals, evInvalQueued) }
func (e *events) retried()      { e.background(nRetriedInvals, evInvalRetried) }
func (e *events) dropped()      { e.background(nDroppedInvals, evInvalDropped) }
func (e *events) localFlushed() { e.background(nLocalFlushes, evLocalFlushed) }
func (e *events) busMessage()   { e.background(nBusMessages, evBusMessage) }

func (e *events) overloaded(ctx context.Context) { e.inCall(ctx, nOverloaded, evOverloaded) }

// redisError counts a failed Redis command and reports it. A command the
// open breaker did not send is counted and passed to the Recorder and
// OnError, but logged only at debug level: the breaker logged its opening.
func (c *Cache[T]) redisError(ctx context.Context, op, key string, err error) error {
	c.ev.redisError(ctx, op, err)
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
