function tierOf(client) {
  return client === 'partner' ? 'gold' : 'standard';
}
