-- acquire: observe a miss and take the lease in one step.
-- KEYS[1]  the entry key
-- KEYS[2]  the namespace generation key (namespaced caches only)
-- ARGV[1]  the lease entry to write (header with kind=lease and a fresh token;
--          its generation bytes are filled in here)
-- ARGV[2]  lease lifetime in milliseconds (relative, server clock)
-- ARGV[3]  token of an entry the caller found undecodable and may replace, or ""
-- ARGV[4]  8 random bytes: the generation to create if the namespace has none
-- ARGV[5]  lifetime of the generation key in milliseconds
-- ARGV[6]  tagged caches: the 8-byte digest of the entry's tag generations
--          as the caller read them (see tags.go), or ""; an entry stamped
--          with another digest is of an older generation
-- Returns {1, gen} when the caller holds the lease (including a client retry
-- of a call that already took it), or {0, gen, current} when another entry
-- of the current generation is there. gen is "" outside namespaces.
local gen = ''
if #KEYS > 1 then
  gen = redis.pcall('GET', KEYS[2])
  if type(gen) ~= 'string' or #gen ~= 8 then
    gen = ARGV[4]
    redis.call('SET', KEYS[2], gen, 'PX', ARGV[5])
  else
    redis.call('PEXPIRE', KEYS[2], ARGV[5])
  end
elseif ARGV[6] and #ARGV[6] == 8 then
  gen = ARGV[6]
end
local lease = ARGV[1]
if gen ~= '' then
  lease = string.sub(lease, 1, 32) .. gen .. string.sub(lease, 41)
end
local cur = redis.pcall('GET', KEYS[1])
if type(cur) == 'string' then
  local valid = #cur >= 40 and string.sub(cur, 1, 2) == string.sub(lease, 1, 2)
  if valid and (gen == '' or string.sub(cur, 33, 40) == gen) then
    local tok = string.sub(cur, 5, 20)
    if tok == string.sub(lease, 5, 20) and string.byte(cur, 3) == 3 then
      return {1, gen}
    end
    local kind = string.byte(cur, 3)
    -- Another caller's lease with no lifetime (written by hand, or left by
    -- a crash between a SET and its PEXPIRE) would hold every reader until
    -- it is deleted: a lease whose lifetime cannot be established counts as
    -- expired, and is taken over below.
    local orphan = (kind == 3 or kind == 4) and redis.call('PTTL', KEYS[1]) == -1
    if not orphan and (ARGV[3] == '' or tok ~= ARGV[3]) then
      if kind == 3 and string.sub(cur, 29, 32) == '\0\0\0\0' then
        -- Someone now waits for this lease: mark it contended (the load
        -- time field of a lease), so its fill or release wakes the waiters.
        redis.call('SETRANGE', KEYS[1], 28, '\0\0\0\1')
      end
      return {0, gen, cur}
    end
  end
end
-- absent, foreign bytes, another format version, a non-string type, an
-- entry of an older namespace generation, a lease without a lifetime, or
-- the undecodable entry the caller named: take it over.
redis.call('SET', KEYS[1], lease, 'PX', ARGV[2])
return {1, gen}
