// Subscriptions: one loop that keeps a pub/sub channel subscribed until
// Close, with a health check, for the local tier's invalidation bus and
// for waking waiters when a fill lands.

package cacheaside

import (
	"context"
	"errors"
	"fmt"
	"net"
	"runtime/debug"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
)

// subscriber keeps one channel subscribed until stop ends.
type subscriber struct {
	bus     Bus
	channel string
	hc      time.Duration // silence before a PING; as long again for its PONG

	// up runs when a subscription is confirmed; down when it is lost
	// (confirmed says whether it had been up); message for each message.
	// They run on the subscriber's goroutine.
	up      func()
	down    func(err error, confirmed bool)
	message func(payload string)

	mu sync.Mutex    // protects ps
	ps *redis.PubSub // the current subscription, closed by Close
}

// run keeps the subscription until stop ends, subscribing again with a
// jittered backoff (10ms up to hc) after each loss.
func (s *subscriber) run(stop context.Context) {
	stopClose := context.AfterFunc(stop, func() {
		s.mu.Lock()
		defer s.mu.Unlock()
		if s.ps != nil {
			_ = s.ps.Close()
		}
	})
	defer stopClose()
	const firstBackoff = 10 * time.Millisecond
	backoff := firstBackoff
	for stop.Err() == nil {
		confirmed, err := s.onceSafe(stop)
		if stop.Err() != nil {
			return
		}
		if confirmed {
			backoff = firstBackoff
		}
		s.down(err, confirmed)
		if sleep(stop, jitter(backoff)) != nil {
			return
		}
		backoff = min(2*backoff, s.hc)
	}
}

// onceSafe is once with a panic (go-redis's Ring panics on Subscribe when
// no shard is up; a Recorder or OnError may panic too) turned into an
// error.
func (s *subscriber) onceSafe(stop context.Context) (confirmed bool, err error) {
	defer func() {
		if r := recover(); r != nil {
			err = panicIn("a subscription (a Ring without live shards, a Recorder)", r, debug.Stack())
		}
	}()
	return s.once(stop)
}

// once runs one subscription until it fails, and returns why and whether
// it had been confirmed. Every call that may dial gets a deadline (with
// ContextTimeoutEnabled, go-redis puts it on the socket), so a Redis that
// accepts connections but never answers cannot hold Close.
func (s *subscriber) once(stop context.Context) (confirmed bool, _ error) {
	ctx, cancel := context.WithTimeout(stop, s.hc)
	ps := s.bus.Subscribe(ctx, s.channel)
	cancel()
	s.mu.Lock()
	if stop.Err() != nil {
		s.mu.Unlock()
		_ = ps.Close()
		return false, stop.Err()
	}
	s.ps = ps
	s.mu.Unlock()
	defer func() { _ = ps.Close() }()
	pinged := false
	for {
		ctx, cancel := context.WithTimeout(stop, 2*s.hc)
		msg, err := ps.ReceiveTimeout(ctx, s.hc)
		cancel()
		if err != nil {
			var ne net.Error
			if !pinged && errors.As(err, &ne) && ne.Timeout() && stop.Err() == nil {
				pinged = true
				ctx, cancel := context.WithTimeout(stop, s.hc)
				err := ps.Ping(ctx)
				cancel()
				if err != nil {
					return confirmed, err
				}
				continue
			}
			if pinged {
				return confirmed, fmt.Errorf("no PONG within %v: %w", s.hc, err)
			}
			return confirmed, err
		}
		pinged = false
		switch m := msg.(type) {
		case *redis.Subscription:
			if m.Kind == "subscribe" && m.Channel == s.channel {
				confirmed = true
				s.up()
			}
		case *redis.Message:
			s.message(m.Payload)
		}
	}
}
