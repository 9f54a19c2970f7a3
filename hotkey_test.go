package cacheaside

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"

	"github.com/seed-b4ec662f/cacheaside/internal/envelope"
)

// The hot-key simulation: one key read 1,000 times a second for ten
// simulated minutes, TTL 10s, a loader that takes 100ms, on miniredis.
//
// How time is simulated. A driver owns two clocks that it moves together
// in 1ms steps: the cache's Options.Clock (an atomic count of nanoseconds,
// which decides freshness and XFetch) and miniredis's (FastForward, which
// expires keys and leases). At each step it issues the step's Get on a
// goroutine and waits until the simulation is quiescent before moving on:
// the Get has returned or is blocked on a load, every loader that is
// running is blocked waiting for simulated time, and no background refresh
// is between its start and its loader. A loader registers itself with the
// driver, which releases it once the clock is 100ms past the loader's
// start; the clock stands still until the fill that follows is written.
// So what each Get sees depends only on the schedule and on XFetch's coin.
//
// The recorded load time is simulated too: the cache measures loads with
// Options.Clock, so each entry records LoadMillis = 100 and XFetch weighs
// the load as it would in production.
//
// Which reads are issued. At about 70µs per Get under -race, 600,000 Gets
// per variant would take a minute, so reads whose outcome is certain are
// elided: while nothing is loading and the value is fresh and further than
// `lead` from its soft expiry, only one read in hotSparse is issued (10 a
// second); every other millisecond gets its read. lead is 10·Beta·LoadMillis
// of the current entry: XFetch refreshes a read with probability
// exp(−gap/(Beta·LoadMillis)), so all the reads elided before a window's
// dense part would together have refreshed it with probability about
// 100·e^−10 < 0.5% (and only earlier, never later, than the issued reads
// do). With early refresh off nothing but a plain hit can happen before
// expiry, so lead is 0. Eliding reads never hides a hard miss: every read
// from expiry onwards, and while a load runs, is issued.
const (
	hotTTL      = 10 * time.Second
	hotLoadTime = 100 * time.Millisecond
	hotDuration = 10 * time.Minute
	hotSparse   = 100 // ms between the reads issued far from expiry
)

// hotEpoch is where the simulated clock starts.
var hotEpoch = time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC).UnixNano()

func TestHotKeySimulation(t *testing.T) {
	variants := []struct {
		beta   float64
		policy Policy
	}{
		// No stale window in either: zero hard misses must come from
		// XFetch alone.
		{1, Policy{TTL: hotTTL, NoJitter: true, Beta: 1}},
		{0, Policy{TTL: hotTTL, NoJitter: true, NoEarlyRefresh: true}},
	}
	sims := make([]*hotSim, len(variants))
	for i, v := range variants {
		mr := miniredis.RunT(t)
		b := &backend{name: "miniredis", addr: mr.Addr(), mr: mr, prefix: uniquePrefix()}
		s := &hotSim{mr: mr, key: b.key("hot"), beta: v.beta, kick: make(chan struct{}, 1)}
		s.nanos.Store(hotEpoch)
		s.c = newCache(t, b, &Options[string]{
			Name:        fmt.Sprintf("hotkey-beta%g", v.beta),
			Policy:      v.policy,
			Clock:       func() time.Time { return time.Unix(0, s.nanos.Load()) },
			LoadTimeout: time.Minute, // real time; loads are released by the driver
		})
		s.c.hooks = &testHooks{afterMiss: s.missed}
		sims[i] = s
	}

	start := time.Now()
	results := make([]hotResult, len(sims))
	errs := make([]error, len(sims))
	var wg sync.WaitGroup
	for i, s := range sims {
		wg.Go(func() { results[i], errs[i] = s.run() })
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("hotkey(beta=%g): %v", variants[i].beta, err)
		}
	}

	windows := int(hotDuration / hotTTL)
	for _, r := range results {
		t.Logf("hotkey(beta=%g): %d windows, %d loads, %.2f refreshes/window, %d hard misses after warm-up, max %d concurrent load",
			r.beta, windows, r.loads, float64(r.loads)/float64(windows), r.hardMisses, r.maxLoads)
		t.Logf("hotkey(beta=%g) detail: %d Gets issued, %d certain hits elided, %d Gets waited for a load, %d coalesced, %d background refreshes, last entry LoadMillis %d, simulated %v in %v real",
			r.beta, r.issued, r.elided, r.slow, r.stats.Coalesced, r.stats.Refreshes, r.loadMillis, r.simulated, r.real)
	}
	t.Logf("hotkey: both variants in %v real", time.Since(start).Round(time.Millisecond))

	for _, r := range results {
		name := fmt.Sprintf("hotkey(beta=%g)", r.beta)
		if r.errors > 0 {
			t.Errorf("%s: %d Gets failed, last: %v", name, r.errors, r.lastErr)
		}
		if r.anomalies > 0 {
			t.Errorf("%s: %d misses the driver could not attribute to the Get it issued", name, r.anomalies)
		}
		if st := r.stats; st.LoadErrors+st.RedisErrors+st.FillsRejected+st.DecodeErrors > 0 {
			t.Errorf("%s: unexpected failures: %+v", name, st)
		}
		if r.maxLoads != 1 {
			t.Errorf("%s: max %d concurrent loads, want 1", name, r.maxLoads)
		}
		if r.loads < int64(windows) {
			t.Errorf("%s: %d loads in %d TTL windows: the value outlived its TTL", name, r.loads, windows)
		}
	}
	on, off := results[0], results[1]
	if on.hardMisses != 0 || on.slow != 0 {
		t.Errorf("hotkey(beta=1): %d hard misses (Stats.Misses after warm-up), %d Gets waited for a load; want 0 with early refresh",
			on.hardMisses, on.slow)
	}
	if on.stats.Refreshes < uint64(windows) {
		t.Errorf("hotkey(beta=1): %d background refreshes in %d windows, want one per window", on.stats.Refreshes, windows)
	}
	// XFetch should reload a hot key about once per TTL, not several times.
	if limit := int64(windows)*6/5 + 1; on.loads > limit {
		t.Errorf("hotkey(beta=1): %d loads in %d windows, want at most %d", on.loads, windows, limit)
	}
	if off.hardMisses == 0 || off.slow == 0 {
		t.Errorf("hotkey(beta=0): %d hard misses, %d Gets waited for a load; want > 0 (every expiry makes readers wait), or the comparison means nothing",
			off.hardMisses, off.slow)
	}
}

type hotResult struct {
	beta       float64
	loads      int64  // loader calls, the warm-up load included
	hardMisses uint64 // Stats.Misses after warm-up
	slow       int64  // Gets that returned after simulated time had moved on
	maxLoads   int64  // most loader calls running at once
	issued     int64  // Gets issued in the ten minutes
	elided     int64  // reads of the 1,000/s not issued (certain fresh hits)
	errors     int64
	lastErr    error
	anomalies  int64
	loadMillis uint32 // LoadMillis of the entry at the end
	stats      Stats
	simulated  time.Duration
	real       time.Duration
}

// hotSim drives one variant. The driver (run) is the only goroutine that
// moves the clock or issues Gets.
type hotSim struct {
	mr    *miniredis.Miniredis
	c     *Cache[string]
	key   string
	beta  float64
	nanos atomic.Int64 // the simulated clock, Unix nanoseconds
	kick  chan struct{}

	inLoader, maxInLoader, calls atomic.Int64

	mu          sync.Mutex
	pending     []*hotLoad // loaders waiting for simulated time
	outstanding int        // Gets not yet returned
	missedOut   int        // of those, Gets that missed
	cur         *hotRead   // the Get issued last
	slow        int64
	errors      int64
	lastErr     error
	anomalies   int64

	gets sync.WaitGroup
}

type hotLoad struct {
	due     int64 // simulated Unix nanoseconds
	release chan struct{}
}

type hotRead struct {
	issued       int64
	done, missed bool
}

func (s *hotSim) poke() {
	select {
	case s.kick <- struct{}{}:
	default:
	}
}

// load is the loader: 100ms of simulated time, released by the driver.
func (s *hotSim) load(ctx context.Context) (string, error) {
	n := s.inLoader.Add(1)
	defer func() { s.inLoader.Add(-1); s.poke() }()
	for m := s.maxInLoader.Load(); n > m && !s.maxInLoader.CompareAndSwap(m, n); m = s.maxInLoader.Load() {
	}
	call := s.calls.Add(1)
	p := &hotLoad{release: make(chan struct{})}
	s.mu.Lock()
	p.due = s.nanos.Load() + int64(hotLoadTime)
	s.pending = append(s.pending, p)
	s.mu.Unlock()
	s.poke()
	select {
	case <-p.release:
	case <-ctx.Done():
		return "", ctx.Err()
	}
	return fmt.Sprintf("v%d", call), nil
}

// missed is the afterMiss hook. It runs on the goroutine of the Get that
// missed, which is the one issued last: the driver issues no Get before
// the previous one has returned or missed.
func (s *hotSim) missed(string) {
	s.mu.Lock()
	if r := s.cur; r != nil && !r.done && !r.missed {
		r.missed = true
		s.missedOut++
	} else {
		s.anomalies++
	}
	s.mu.Unlock()
	s.poke()
}

// get issues one Get at the current simulated time.
func (s *hotSim) get() {
	r := &hotRead{issued: s.nanos.Load()}
	s.mu.Lock()
	s.cur = r
	s.outstanding++
	s.mu.Unlock()
	s.gets.Go(func() {
		v, err := s.c.Get(context.Background(), s.key, s.load)
		s.mu.Lock()
		r.done = true
		s.outstanding--
		if r.missed {
			s.missedOut--
		}
		if s.nanos.Load() != r.issued {
			s.slow++
		}
		if err != nil || v == "" {
			s.errors++
			s.lastErr = fmt.Errorf("Get = %q, %w", v, err)
		}
		s.mu.Unlock()
		s.poke()
	})
}

// advance moves both clocks by d and releases the loaders that are due.
func (s *hotSim) advance(d time.Duration) {
	s.mr.FastForward(d)
	s.mu.Lock()
	now := s.nanos.Add(int64(d))
	keep := s.pending[:0]
	for _, p := range s.pending {
		if p.due <= now {
			close(p.release)
		} else {
			keep = append(keep, p)
		}
	}
	s.pending = keep
	s.mu.Unlock()
}

// refreshing reports whether a background refresh of the key is running.
func (s *hotSim) refreshing() bool {
	return s.c.refreshes.running(s.key)
}

// quiet reports whether simulated time may move: the last Get returned or
// missed, every running loader waits for simulated time, a Get that missed
// has a load to wait for, and a running refresh has reached its loader.
func (s *hotSim) quiet() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if r := s.cur; r != nil && !r.done && !r.missed {
		return false
	}
	blocked := len(s.pending)
	if s.inLoader.Load() != int64(blocked) {
		return false
	}
	if blocked == 0 && (s.missedOut > 0 || s.refreshing()) {
		return false
	}
	return true
}

func (s *hotSim) idle() bool {
	s.mu.Lock()
	busy := s.outstanding > 0 || len(s.pending) > 0 || s.inLoader.Load() > 0
	s.mu.Unlock()
	return !busy && !s.refreshing()
}

func (s *hotSim) waitQuiet() error {
	deadline := time.Now().Add(30 * time.Second)
	for !s.quiet() {
		if time.Now().After(deadline) {
			s.mu.Lock()
			defer s.mu.Unlock()
			return fmt.Errorf("stuck at simulated %v: last Get %+v, %d outstanding, %d missed, %d loaders running, %d waiting, refreshing %v",
				time.Duration(s.nanos.Load()-hotEpoch), s.cur, s.outstanding, s.missedOut, s.inLoader.Load(), len(s.pending), s.refreshing())
		}
		select {
		case <-s.kick:
		case <-time.After(200 * time.Microsecond):
		}
	}
	return nil
}

// step moves time by d and waits for what that set off.
func (s *hotSim) step(d time.Duration) error {
	s.advance(d)
	return s.waitQuiet()
}

// next returns the simulated millisecond (from the start, t now) of the
// next read to issue: t+1 while anything is in flight or the entry is
// within lead of its soft expiry, else the next sparse read.
func (s *hotSim) next(t int64) int64 {
	if !s.idle() {
		return t + 1
	}
	raw, err := s.mr.Get(s.key)
	if err != nil {
		return t + 1 // absent
	}
	var e envelope.Entry
	if envelope.Decode([]byte(raw), &e) != nil || e.Kind != envelope.Value || e.SoftExpiry == 0 {
		return t + 1
	}
	lead := int64(10 * s.beta * float64(max(e.LoadMillis, 1)))
	until := e.SoftExpiry - lead - s.nanos.Load()/int64(time.Millisecond) // ms to the dense part
	if until <= 1 {
		return t + 1
	}
	return min((t/hotSparse+1)*hotSparse, t+until)
}

func (s *hotSim) run() (res hotResult, err error) {
	res.beta = s.beta
	realStart := time.Now()
	defer func() {
		// On failure, let every loader and Get finish before Close.
		s.mu.Lock()
		for _, p := range s.pending {
			close(p.release)
		}
		s.pending = nil
		s.mu.Unlock()
		s.gets.Wait()
	}()

	// Warm-up: the first Get misses and loads; no other reads until the
	// value is in.
	s.get()
	if err := s.waitQuiet(); err != nil {
		return res, err
	}
	for !s.idle() {
		if err := s.step(time.Millisecond); err != nil {
			return res, err
		}
	}
	warm := s.c.Stats()
	if warm.Misses != 1 || s.calls.Load() != 1 {
		return res, fmt.Errorf("warm-up: %d misses, %d loads; want 1 each", warm.Misses, s.calls.Load())
	}
	s.mu.Lock()
	warmSlow := s.slow
	s.mu.Unlock()

	// Ten minutes of reads, one per simulated millisecond.
	total := hotDuration.Milliseconds()
	for t := int64(0); t < total; {
		s.get()
		res.issued++
		if err := s.waitQuiet(); err != nil {
			return res, err
		}
		n := min(s.next(t), total)
		res.elided += n - t - 1
		if err := s.step(time.Duration(n-t) * time.Millisecond); err != nil {
			return res, err
		}
		t = n
	}
	// Let the last load or refresh finish, without reads.
	for i := 0; !s.idle(); i++ {
		if i > 10_000 {
			return res, errors.New("the last load did not finish within 10 simulated seconds")
		}
		if err := s.step(time.Millisecond); err != nil {
			return res, err
		}
	}
	s.gets.Wait()

	res.stats = s.c.Stats()
	res.hardMisses = res.stats.Misses - warm.Misses
	res.loads = s.calls.Load()
	res.maxLoads = s.maxInLoader.Load()
	s.mu.Lock()
	res.slow = s.slow - warmSlow
	res.errors, res.lastErr, res.anomalies = s.errors, s.lastErr, s.anomalies
	s.mu.Unlock()
	if raw, err := s.mr.Get(s.key); err == nil {
		var e envelope.Entry
		if envelope.Decode([]byte(raw), &e) == nil {
			res.loadMillis = e.LoadMillis
		}
	}
	res.simulated = time.Duration(s.nanos.Load() - hotEpoch)
	res.real = time.Since(realStart).Round(time.Millisecond)
	return res, nil
}
