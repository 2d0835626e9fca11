//! Model Armor (issue 15 item 5): request and result types.
