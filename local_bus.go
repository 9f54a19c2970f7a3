// The local tier's invalidation bus: messages, publishing after Redis applied
// an invalidation, and the subscription that keeps the tier coherent.

package cacheaside

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"runtime/debug"
	"time"

	"github.com/redis/go-redis/v9"
)

// Bus messages: a kind byte, then for msgKeys each key as a uvarint length
// and its bytes, for msgPrefix the prefix.
const (
	msgKeys      = 'k'
	msgPrefix    = 'p'
	msgNamespace = 'n' // followed by the namespace's generation key
)

func keysMessage(keys []string) []byte {
	n := 1
	for _, k := range keys {
		n += binary.MaxVarintLen64 + len(k)
	}
	b := make([]byte, 1, n)
	b[0] = msgKeys
	for _, k := range keys {
		b = binary.AppendUvarint(b, uint64(len(k)))
		b = append(b, k...)
	}
	return b
}

func prefixMessage(prefix string) []byte { return append([]byte{msgPrefix}, prefix...) }

// apply carries out one bus message. A message it cannot parse flushes the
// tier: something invalidated, and it cannot tell what.
func (l *localTier[T]) apply(msg string) error {
	l.ev.busMessage()
	if msg == "" {
		l.flush()
		return errors.New("empty message")
	}
	switch msg[0] {
	case msgPrefix:
		l.dropPrefix(msg[1:])
		return nil
	case msgNamespace:
		l.bump(msg[1:])
		return nil
	case msgKeys:
		rest := msg[1:]
		var keys []string
		for len(rest) > 0 {
			n, w := binary.Uvarint([]byte(rest[:min(len(rest), binary.MaxVarintLen64)]))
			if w <= 0 || uint64(len(rest)-w) < n {
				l.flush()
				return errors.New("truncated key list")
			}
			keys = append(keys, rest[w:w+int(n)])
			rest = rest[w+int(n):]
		}
		l.dropKeys(keys)
		return nil
	}
	l.flush()
	return fmt.Errorf("unknown message kind %q", msg[0])
}

// publish tells every Cache on the channel (this one included) what was
// invalidated, after Redis applied it.
func (c *Cache[T]) publish(ctx context.Context, msg []byte, what string) error {
	if err := c.guard.publish(ctx, c.local.bus, c.local.opts.Channel, msg); err != nil {
		return c.redisError(ctx, "publish", what, err)
	}
	return nil
}

// invalidated drops keys from this process's local tier and publishes them
// to the others. It is a no-op without a local tier.
func (c *Cache[T]) invalidated(ctx context.Context, keys []string) error {
	if c.local == nil {
		return nil
	}
	c.local.dropKeys(keys)
	return c.publish(ctx, keysMessage(keys), keysLabel(keys))
}

// invalidatedNamespace is invalidated for every key of the namespace
// whose generation key is genKey.
func (c *Cache[T]) invalidatedNamespace(ctx context.Context, genKey string) error {
	if c.local == nil {
		return nil
	}
	c.local.bump(genKey)
	return c.publish(ctx, append([]byte{msgNamespace}, genKey...), genKey)
}

// invalidatedPrefix is invalidated for every key starting with prefix.
func (c *Cache[T]) invalidatedPrefix(ctx context.Context, prefix string) error {
	if c.local == nil {
		return nil
	}
	c.local.dropPrefix(prefix)
	return c.publish(ctx, prefixMessage(prefix), prefix)
}

// listen keeps the subscription to the bus until Close, applying each
// message. Whenever the subscription may have missed a message (it failed,
// or stayed silent through a health check) the tier is flushed and stays
// bypassed until a new subscription is confirmed.
func (c *Cache[T]) listen() {
	defer c.wg.Done()
	l := c.local
	stopClose := context.AfterFunc(c.stop, func() {
		l.mu.Lock()
		defer l.mu.Unlock()
		if l.ps != nil {
			_ = l.ps.Close()
		}
	})
	defer stopClose()
	const firstBackoff = 10 * time.Millisecond
	backoff := firstBackoff
	first := true
	for c.stop.Err() == nil {
		confirmed, err := c.subscriptionSafe()
		l.live.Store(false)
		l.flush()
		if c.stop.Err() != nil {
			return
		}
		if confirmed {
			backoff = firstBackoff
		}
		c.busLost(err, confirmed || first)
		first = false
		if sleep(c.stop, jitter(backoff)) != nil {
			return
		}
		backoff = min(2*backoff, l.opts.HealthCheck)
	}
}

// busLost reports a lost subscription: to the logger when it had been
// confirmed (or never was: the first try), otherwise only to the Recorder
// and Stats, so an outage logs the loss once and the return once. A
// panicking Recorder or logger must not end the process from this
// goroutine.
func (c *Cache[T]) busLost(err error, log bool) {
	defer func() { _ = recover() }()
	if log {
		c.local.lost.Store(true)
		c.opts.Logger.LogAttrs(c.stop, slog.LevelWarn, "cacheaside: invalidation bus lost; local tier bypassed until it is back",
			slog.String("cache", c.name), slog.String("channel", c.local.opts.Channel), slog.Any("err", err))
	}
	c.ev.redisError("subscribe", err)
}

// subscriptionSafe is subscription with a panic (go-redis's Ring panics on
// Subscribe when no shard is up; a Recorder or OnError may panic too)
// turned into an error.
func (c *Cache[T]) subscriptionSafe() (confirmed bool, err error) {
	defer func() {
		if r := recover(); r != nil {
			err = &PanicError{Value: r, Stack: debug.Stack()}
		}
	}()
	return c.subscription()
}

// subscription runs one subscription until it fails, and returns why and
// whether it had been confirmed. Every call that may dial gets a deadline
// (with ContextTimeoutEnabled, go-redis puts it on the socket), so a Redis
// that accepts connections but never answers cannot hold Close.
func (c *Cache[T]) subscription() (confirmed bool, _ error) {
	l := c.local
	hc := l.opts.HealthCheck
	ctx, cancel := context.WithTimeout(c.stop, hc)
	ps := l.bus.Subscribe(ctx, l.opts.Channel)
	cancel()
	l.mu.Lock()
	if c.stop.Err() != nil {
		l.mu.Unlock()
		_ = ps.Close()
		return false, c.stop.Err()
	}
	l.ps = ps
	l.mu.Unlock()
	defer func() { _ = ps.Close() }()
	pinged := false
	for {
		ctx, cancel := context.WithTimeout(c.stop, 2*hc)
		msg, err := ps.ReceiveTimeout(ctx, hc)
		cancel()
		if err != nil {
			var ne net.Error
			if !pinged && errors.As(err, &ne) && ne.Timeout() && c.stop.Err() == nil {
				pinged = true
				ctx, cancel := context.WithTimeout(c.stop, hc)
				err := ps.Ping(ctx)
				cancel()
				if err != nil {
					return confirmed, err
				}
				continue
			}
			if pinged {
				return confirmed, fmt.Errorf("no PONG within %v: %w", hc, err)
			}
			return confirmed, err
		}
		pinged = false
		switch m := msg.(type) {
		case *redis.Subscription:
			if m.Kind == "subscribe" && m.Channel == l.opts.Channel {
				// Whatever was published before this point is lost to us:
				// start from an empty tier.
				l.flush()
				l.live.Store(true)
				confirmed = true
				if l.lost.Swap(false) {
					c.opts.Logger.LogAttrs(c.stop, slog.LevelInfo, "cacheaside: invalidation bus back; local tier in use again",
						slog.String("cache", c.name), slog.String("channel", l.opts.Channel))
				}
			}
		case *redis.Message:
			if err := l.apply(m.Payload); err != nil {
				c.report(c.stop, "bus", m.Channel, fmt.Errorf("invalidation message: %w; local tier flushed", err))
			}
		}
	}
}
