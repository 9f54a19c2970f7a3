-- warm: write an entry unless a load is in flight for the key (SetMany): a
-- live lease, or a value being refreshed whose holder's deadline has not
-- passed, of the namespace's current generation, is left to its holder's
-- fill. In a namespace the entry is stamped with the current generation
-- (one is created if the namespace has none), as set.lua does.
-- KEYS[1]  the entry key
-- KEYS[2]  the namespace generation key (namespaced caches only)
-- ARGV[1]  the entry (its generation bytes are filled in here, in a namespace)
-- ARGV[2]  its lifetime in milliseconds
-- ARGV[3]  8 random bytes: the generation to create if the namespace has none
-- ARGV[4]  lifetime of the generation key in milliseconds
-- Returns 1 when the entry was written (including a client retry of a call
-- that already wrote it), 0 when a load in flight holds the key.
local cur = redis.pcall('GET', KEYS[1])
if type(cur) == 'string' and #cur >= 40 and string.sub(cur, 5, 20) == string.sub(ARGV[1], 5, 20) then
  return 1 -- a client retry of a call that already wrote
end
local gen = ''
if #KEYS > 1 then
  gen = redis.pcall('GET', KEYS[2])
  if type(gen) ~= 'string' or #gen ~= 8 then
    gen = ARGV[3]
    redis.call('SET', KEYS[2], gen, 'PX', ARGV[4])
  else
    redis.call('PEXPIRE', KEYS[2], ARGV[4])
  end
end
if type(cur) == 'string' and #cur >= 40 and string.sub(cur, 1, 2) == string.sub(ARGV[1], 1, 2)
    and (gen == '' or string.sub(cur, 33, 40) == gen) then
  local kind = string.byte(cur, 3)
  if kind == 3 and redis.call('PTTL', KEYS[1]) > 0 then
    return 0
  end
  if kind == 4 then
    local t = redis.call('TIME')
    local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    local a, b, c, d = string.byte(cur, 29, 32)
    local deadline = ((a * 256 + b) * 256 + c) * 256 + d
    if (now - deadline) % 4294967296 >= 2147483648 then
      return 0 -- the refresh holder's deadline is ahead: it is alive
    end
  end
end
local entry = ARGV[1]
if gen ~= '' then
  entry = string.sub(entry, 1, 32) .. gen .. string.sub(entry, 41)
end
redis.call('SET', KEYS[1], entry, 'PX', ARGV[2])
return 1
