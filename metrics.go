// Metrics: Stats, the snapshot of a Cache's counters (Cache.Stats), the
// table of counters the metrics adapters export (Stats.Counters), the
// load-time buckets, and the Recorder that is told of each event as it
// happens. The counters themselves and the sink that keeps them are in
// events.go.
//
// To add a counter: a stat in events.go (counted where the event happens,
// and read into Stats in snapshot), a Stats field and a row of
// counterTable here. cacheprometheus and cacheotel export every row.

package cacheaside

import (
	"context"
	"time"
)

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
	// LoadsWithin is the histogram of loader call durations: bucket i
	// counts the calls (Loads and LoadErrors) that returned within its Le,
	// from 1ms to 30s, cumulative like a Prometheus histogram's buckets;
	// Loads + LoadErrors is the count of all.
	LoadsWithin    []LoadBucket
	Coalesced      uint64 // Gets that shared another Get's in-process load
	LeaseContended uint64 // keys whose load waited for another holder's fill
	FillsRejected  uint64 // fills refused because the lease was gone
	NotCached      uint64 // values returned but too large or unencodable to cache
	DecodeErrors   uint64 // entries that could not be decoded
	RedisErrors    uint64 // Redis calls sent that failed (error replies, timeouts, broken connections); a pipeline counts once, a coalesced read once per Get that waited on it
	StaleServed    uint64 // answers with a value past its TTL, inside the stale-while-revalidate window (a first read's counts in Hits too)
	StaleIfError   uint64 // answers with the old value because its reload failed
	SoftTimeouts   uint64 // answers with the old value because its reload ran past Options.SoftLoadTimeout (the reload went on)
	Unchanged      uint64 // reloads whose value came back the same (see Reloading): the entry's life extended, the value not sent again
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
	Starved        uint64 // Redis commands that timed out only because this process was not scheduled in time (CPU quota, busy host): not counted in RedisErrors, not told to the breaker, and the Get went on with Redis

	// State now, not counts:
	Breaker      string        // the worst of the circuit breakers (one per Redis node for reads, one for writes): "open" if any is, else "half-open" if any is, else "closed"; "disabled" with Degradation.NoBreaker. The breakers' "closed" means Redis is in use; after Cache.Close it is the state they were left in
	LocalLive    bool          // the local tier is in use: its bus subscription is confirmed (see WaitLocal); false without one, and whenever the bus is lost (Gets then read Redis)
	LocalEntries uint64        // entries the local tier holds (an estimate); 0 without one
	ReadBudget   time.Duration // the budget a Redis read gets now: Degradation.OpTimeout, or more while Redis answers slowly (up to MaxOpTimeout)
}

// HitRate is Hits / (Hits + NegativeHits + Misses): the fraction of Gets answered with a value
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
func (s Stats) HitRate() float64 { return ratio(s.Hits, s.requests()) }

// NegativeHitRate is NegativeHits / (Hits + NegativeHits + Misses): the fraction of Gets
// answered "not found" by a tombstone, without the loader.
func (s Stats) NegativeHitRate() float64 { return ratio(s.NegativeHits, s.requests()) }

// requests is the number of Gets counted: Hits + NegativeHits + Misses.
func (s Stats) requests() uint64 { return s.Hits + s.NegativeHits + s.Misses }

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
	s.ReadBudget = c.guard.readBudget()
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

// numLoadBuckets is the number of load-time buckets in Stats.LoadsWithin.
const numLoadBuckets = 14

// loadBounds are the buckets' upper bounds: from 1ms to 30s, about ×2.5
// apart, covering a fast key lookup to a loader at a generous LoadTimeout.
var loadBounds = [numLoadBuckets]time.Duration{
	time.Millisecond, 2500 * time.Microsecond, 5 * time.Millisecond, 10 * time.Millisecond,
	25 * time.Millisecond, 50 * time.Millisecond, 100 * time.Millisecond, 250 * time.Millisecond,
	500 * time.Millisecond, time.Second, 2500 * time.Millisecond, 5 * time.Second,
	10 * time.Second, 30 * time.Second,
}

// LoadBucket is one bucket of Stats.LoadsWithin.
type LoadBucket struct {
	Le    time.Duration // the bucket's upper bound
	Count uint64        // loader calls that returned within Le (cumulative)
}

// loadBucket is the counter of the first bucket d fits in; a load longer
// than the last bound counts in no bucket, only in Loads or LoadErrors
// (the +Inf bucket).
func loadBucket(d time.Duration) stat {
	for i, b := range loadBounds {
		if d <= b {
			return stat(i)
		}
	}
	return numLoadBuckets
}

// Counter is one of a cache's counters as Stats.Counters lists them, for
// export to a metrics system: cacheprometheus exports each as
// cacheaside_<Name>_total (dots become underscores), cacheotel as
// cacheaside.<Name>.
type Counter struct {
	Name   string // "requests", "loads", "coalesced", "redis.errors", ...
	Result string // the result a member of the "requests" or "loads" family counts ("hit", "negative_hit", "miss"; "ok", "error"); "" for the others
	Unit   string // as OpenTelemetry writes units: "{request}", "{key}", ...
	Help   string // the same for every member of a family
	Value  uint64
}

// counterTable is every counter of Stats, in the order Counters lists them.
var counterTable = [...]struct {
	name, result, unit, help string
	value                    func(*Stats) uint64
}{
	{"requests", "hit", "{request}", helpRequests, func(s *Stats) uint64 { return s.Hits }},
	{"requests", "negative_hit", "{request}", helpRequests, func(s *Stats) uint64 { return s.NegativeHits }},
	{"requests", "miss", "{request}", helpRequests, func(s *Stats) uint64 { return s.Misses }},
	{"loads", "ok", "{call}", helpLoads, func(s *Stats) uint64 { return s.Loads }},
	{"loads", "error", "{call}", helpLoads, func(s *Stats) uint64 { return s.LoadErrors }},
	{"local_hits", "", "{request}", "Gets the local tier answered with a value (part of the hits).", func(s *Stats) uint64 { return s.LocalHits }},
	{"local_negative_hits", "", "{request}", "Gets the local tier answered \"not found\" (part of the negative hits).", func(s *Stats) uint64 { return s.LocalNegativeHits }},
	{"coalesced", "", "{request}", "Gets that shared a load another Get of this process ran.", func(s *Stats) uint64 { return s.Coalesced }},
	{"lease_contended_keys", "", "{key}", "Keys whose load waited for another holder's fill instead of loading.", func(s *Stats) uint64 { return s.LeaseContended }},
	{"fills_rejected", "", "{fill}", "Fills refused because their lease was gone (invalidated or taken over).", func(s *Stats) uint64 { return s.FillsRejected }},
	{"not_cached", "", "{value}", "Loaded values returned but not cached: too large or not encodable.", func(s *Stats) uint64 { return s.NotCached }},
	{"decode_errors", "", "{entry}", "Entries that could not be decoded; each was treated as a miss.", func(s *Stats) uint64 { return s.DecodeErrors }},
	{"redis.errors", "", "{command}", "Redis commands sent that failed (error replies, timeouts, broken connections).", func(s *Stats) uint64 { return s.RedisErrors }},
	{"redis.skipped", "", "{command}", "Redis commands not sent: the circuit breaker was open, or the Get's Redis time was spent.", func(s *Stats) uint64 { return s.RedisSkipped }},
	{"stale_served", "", "{request}", "Answers with a value past its TTL, inside the stale-while-revalidate window.", func(s *Stats) uint64 { return s.StaleServed }},
	{"stale_if_error", "", "{request}", "Answers with the old value because its reload failed.", func(s *Stats) uint64 { return s.StaleIfError }},
	{"soft_timeouts", "", "{request}", "Answers with the old value because its reload ran past the soft load timeout.", func(s *Stats) uint64 { return s.SoftTimeouts }},
	{"reloads_unchanged", "", "{reload}", "Reloads whose value came back the same: the entry's life was extended, its value not sent again.", func(s *Stats) uint64 { return s.Unchanged }},
	{"refreshes", "", "{refresh}", "Background refreshes that ran their loader.", func(s *Stats) uint64 { return s.Refreshes }},
	{"refresh_errors", "", "{refresh}", "Background refreshes that failed.", func(s *Stats) uint64 { return s.RefreshErrors }},
	{"invalidated_keys", "", "{key}", "Keys deleted by Invalidate and InvalidatePrefix.", func(s *Stats) uint64 { return s.Invalidations }},
	{"namespace_bumps", "", "{bump}", "Namespaces given a new generation by InvalidateNamespace.", func(s *Stats) uint64 { return s.NamespaceBumps }},
	{"breaker.opens", "", "{open}", "Times a Redis circuit breaker opened.", func(s *Stats) uint64 { return s.BreakerOpens }},
	{"overloaded", "", "{request}", "Gets refused with ErrOverloaded (no load slot while Redis was down).", func(s *Stats) uint64 { return s.Overloaded }},
	{"invalidations.queued", "", "{invalidation}", "Failed invalidations queued for retry.", func(s *Stats) uint64 { return s.QueuedInvals }},
	{"invalidations.retried", "", "{invalidation}", "Failed invalidations applied later by a retry.", func(s *Stats) uint64 { return s.RetriedInvals }},
	{"invalidations.dropped", "", "{invalidation}", "Failed invalidations given up (too old, or the retry queue was full).", func(s *Stats) uint64 { return s.DroppedInvals }},
	{"local.flushes", "", "{flush}", "Times the local tier was emptied (bus lost or regained, an unreadable message).", func(s *Stats) uint64 { return s.LocalFlushes }},
	{"redis.starved", "", "{command}", "Redis commands that timed out because this process was not scheduled in time (a CPU quota's throttling, a busy host); not Redis failures.", func(s *Stats) uint64 { return s.Starved }},
	{"bus.messages", "", "{message}", "Invalidation messages received from the bus and applied to the local tier.", func(s *Stats) uint64 { return s.BusMessages }},
}

const (
	helpRequests = "Gets by the outcome of their first read: hit (a value, from Redis or the local tier), negative_hit (a \"not found\" tombstone) or miss. A GetMany counts once per distinct key."
	helpLoads    = "Loader calls by result: ok (a value or \"not found\") or error (errors, panics, timeouts)."
)

// Counters lists every counter of s, with its name, unit and help, for
// metrics adapters: a new counter reaches them without changes there. The
// load-time histogram (LoadsWithin, LoadTime) and the states
// (PendingInvals, Breaker, LocalLive, LocalEntries) are not counters and
// are not listed.
func (s Stats) Counters() []Counter {
	out := make([]Counter, len(counterTable))
	for i, row := range counterTable {
		out[i] = Counter{Name: row.name, Result: row.result, Unit: row.unit, Help: row.help, Value: row.value(&s)}
	}
	return out
}

// Recorder is told of every event a Cache counts, as it happens, for a
// metrics system that wants events rather than totals (cacheotel's
// load-duration histogram is one; cacheprometheus reads Stats at scrape
// time instead and needs no Recorder). Record is called on the request
// path, from many goroutines at once, and must be fast. ctx is the
// caller's for events inside a Get or GetMany, and context.Background()
// for background work. Events carry Options.Name, never a key, so labels
// stay low-cardinality. See Event for the kinds.
type Recorder interface {
	Record(ctx context.Context, ev Event)
}
