// Metrics: Stats, the snapshot of a Cache's counters (Cache.Stats), its
// load-time buckets, and the Recorder that receives each count as it
// happens. The counters themselves and the sink that keeps them are in
// events.go.

package cacheaside

import "time"

// Stats is a snapshot of one Cache's counters since New, returned by
// Cache.Stats. Every Get counts exactly once as a Hit, NegativeHit or
// Miss; a GetMany counts once per distinct key. The Local counts are
// parts of the counts they follow: LocalHits ≤ Hits and
// LocalNegativeHits ≤ NegativeHits.
type Stats struct {
	Hits              uint64        // first read found a value (in Redis or, with a local tier, in memory)
	LocalHits         uint64        // of the Hits, those the local tier answered
	NegativeHits      uint64        // first read found a "not found" tombstone (in Redis or in memory)
	LocalNegativeHits uint64        // of the NegativeHits, those the local tier answered
	LocalFlushes      uint64        // times the local tier was emptied (bus lost or regained, unreadable message)
	BusMessages       uint64        // invalidation messages received from the bus and applied to the local tier
	Misses            uint64        // first read found nothing usable
	Loads             uint64        // loader calls that returned a value or ErrNotFound
	LoadErrors        uint64        // loader calls that failed (errors, panics, timeouts)
	LoadTime          time.Duration // total time spent in the loader
	// LoadsWithin[i] counts the loader calls (Loads and LoadErrors) that
	// returned within LoadBucket(i), cumulative like a Prometheus
	// histogram's buckets; Loads + LoadErrors is the count of all.
	LoadsWithin    [NumLoadBuckets]uint64
	Coalesced      uint64 // Gets that shared another Get's in-process load
	LeaseContended uint64 // keys whose load waited for another holder's fill
	FillsRejected  uint64 // fills refused because the lease was gone
	NotCached      uint64 // values returned but too large or unencodable to cache
	DecodeErrors   uint64 // entries that could not be decoded
	RedisErrors    uint64 // Redis calls sent that failed (error replies, timeouts, broken connections); a pipeline counts once, a coalesced read once per Get that waited on it
	StaleServed    uint64 // answers with a value past its TTL, inside the stale-while-revalidate window (a first read's counts in Hits too)
	StaleIfError   uint64 // answers with the old value because its reload failed
	Refreshes      uint64 // background refreshes that ran their loader
	RefreshErrors  uint64 // of those, the ones that failed
	Invalidations  uint64 // keys deleted by Invalidate and InvalidatePrefix
	NamespaceBumps uint64 // InvalidateNamespace calls that succeeded
	BreakerOpens   uint64 // times the Redis circuit breaker opened
	RedisSkipped   uint64 // Redis commands not sent: the breaker was open, or the Get's RedisTimePerGet was spent
	Overloaded     uint64 // Gets refused with ErrOverloaded
	QueuedInvals   uint64 // failed invalidations queued for retry
	PendingInvals  uint64 // of those, the ones still waiting now (a gauge; this process's Gets of their keys load from the source)
	RetriedInvals  uint64 // failed invalidations applied later by a retry
	DroppedInvals  uint64 // failed invalidations given up (too old, or the queue was full)

	// State now, not counts:
	Breaker      string // the worst of the circuit breakers (one per Redis node for reads, one for writes): "open" if any is, else "half-open" if any is, else "closed"; "disabled" with Degradation.NoBreaker
	LocalLive    bool   // the local tier is in use (Cache.LocalLive); false without one
	LocalEntries uint64 // entries the local tier holds (an estimate); 0 without one
}

// Requests is the number of Gets counted: Hits + NegativeHits + Misses.
func (s Stats) Requests() uint64 { return s.Hits + s.NegativeHits + s.Misses }

// HitRate is Hits / Requests: the fraction of Gets answered with a value
// from the cache (Redis or the local tier), in [0, 1], and 0 before the
// first Get. "Not found" answers from tombstones are not hits here, so
// traffic for missing items (404s) cannot raise it; NegativeHitRate counts
// those, and HitRate + NegativeHitRate is the share of Gets that spared
// the loader.
//
// As a rule of thumb for read-heavy data: above 0.9 the cache is working
// well, 0.7–0.9 is normal for varied access, 0.5–0.7 asks for a look at
// TTLs and key design, below 0.5 the wrong things are cached or TTLs are
// too short, and near 0 something is broken (keys that never repeat, a
// version bump on every write, invalidation of everything).
func (s Stats) HitRate() float64 { return ratio(s.Hits, s.Requests()) }

// NegativeHitRate is NegativeHits / Requests: the fraction of Gets
// answered "not found" by a tombstone, without the loader.
func (s Stats) NegativeHitRate() float64 { return ratio(s.NegativeHits, s.Requests()) }

func ratio(a, b uint64) float64 {
	if b == 0 {
		return 0
	}
	return float64(a) / float64(b)
}

// Stats returns a snapshot of the cache's counters.
func (c *Cache[T]) Stats() Stats {
	s := c.ev.snapshot()
	s.PendingInvals = uint64(max(c.retries.pending.Load(), 0))
	s.Breaker = "disabled"
	if br := c.guard.br; br != nil {
		s.Breaker = br.state()
	}
	if l := c.local; l != nil {
		s.LocalLive = l.live.Load()
		s.LocalEntries = uint64(max(l.m.EstimatedSize(), 0))
	}
	return s
}

// NumLoadBuckets is the number of load-time buckets in Stats.LoadsWithin.
const NumLoadBuckets = 14

// loadBounds are the buckets' upper bounds: from 1ms to 30s, about ×2.5
// apart, covering a fast key lookup to a loader at a generous LoadTimeout.
var loadBounds = [NumLoadBuckets]time.Duration{
	time.Millisecond, 2500 * time.Microsecond, 5 * time.Millisecond, 10 * time.Millisecond,
	25 * time.Millisecond, 50 * time.Millisecond, 100 * time.Millisecond, 250 * time.Millisecond,
	500 * time.Millisecond, time.Second, 2500 * time.Millisecond, 5 * time.Second,
	10 * time.Second, 30 * time.Second,
}

// LoadBucket returns the upper bound of Stats.LoadsWithin[i], for
// 0 ≤ i < NumLoadBuckets.
func LoadBucket(i int) time.Duration { return loadBounds[i] }

// loadBucket is the counter of the first bucket d fits in; a load longer
// than the last bound counts in no bucket, only in Loads or LoadErrors
// (the +Inf bucket).
func loadBucket(d time.Duration) stat {
	for i, b := range loadBounds {
		if d <= b {
			return stat(i)
		}
	}
	return NumLoadBuckets
}

// Recorder receives every event a Cache counts, as it is counted, for
// export to a metrics system that wants events rather than totals (the
// cacheotel module's load-duration histogram is one; cacheprometheus reads
// Stats at scrape time instead and needs no Recorder). cache is
// Options.Name; raw keys are never passed, so labels stay low-cardinality.
// Methods are called on the request path and must be fast and safe for
// concurrent use. Embed NopRecorder to implement only some of them.
//
// Every field of Stats has its Recorder method, called from the same place
// that counts it, so the two never disagree; the exceptions are derived:
// Loads, LoadErrors, LoadTime and LoadsWithin come from Load, Refreshes and
// RefreshErrors from Refresh, BreakerOpens from BreakerState("open"), and
// PendingInvals, Breaker, LocalLive and LocalEntries are states read when
// Stats is called.
type Recorder interface {
	// Hit: the first read found a value (in Redis, or in the local tier,
	// when LocalHit follows).
	Hit(cache string)
	// NegativeHit: the first read found a "not found" tombstone (in Redis,
	// or in the local tier, when LocalNegativeHit follows).
	NegativeHit(cache string)
	// LocalHit: the local tier answered a Get with a value (after Hit).
	LocalHit(cache string)
	// LocalNegativeHit: the local tier answered a Get with "not found"
	// (after NegativeHit).
	LocalNegativeHit(cache string)
	// Miss: the first read found no usable entry (absent, being loaded,
	// corrupt, or Redis failed).
	Miss(cache string)
	// Load: the loader returned after d with err: nil, the loader's own
	// error as returned (including its "not found" error, before mapping to
	// ErrNotFound), a *PanicError, or a timeout. A GetMany's batch loader
	// counts as one load.
	Load(cache string, d time.Duration, err error)
	// Coalesced: this Get (or a GetMany's key) joined an in-process load
	// another Get started, instead of loading.
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
	// RedisError: a Redis call was sent and failed (an error reply, a
	// timeout, a broken connection); a pipeline is one call. op names the
	// step ("get", "acquire", "fill", "release", ...). Commands that were
	// not sent are not errors: see RedisSkipped.
	RedisError(cache, op string, err error)
	// RedisSkipped: a command was not sent, because the breaker is open
	// or the Get had spent its Degradation.RedisTimePerGet.
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
	// BreakerState: the worst state of the cache's Redis circuit breakers
	// (one per node and direction, see Stats.Breaker) moved to state
	// ("closed", "open" or "half-open").
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
func (NopRecorder) LocalNegativeHit(string)           {}
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
