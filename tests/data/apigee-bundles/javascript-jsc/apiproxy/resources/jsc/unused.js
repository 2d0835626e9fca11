// not referenced by any policy
